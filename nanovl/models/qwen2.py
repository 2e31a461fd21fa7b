"""Qwen2 decoder (the language model of NVLM-D-72B).

The layer stack is Llama's; what differs is data: q/k/v projections carry a bias and o_proj does not,
whatever `attention_bias` says, and the config defaults differ (rope theta 1e6, RMSNorm eps 1e-6 in
Qwen2-72B, both read from config.json). Sliding-window attention is refused by the config reader.
"""

from __future__ import annotations

from nanovl.config import TextConfig
from nanovl.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_biases(cfg: TextConfig) -> tuple[bool, bool]:
        return True, False
