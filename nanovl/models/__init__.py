"""Model registry: the checkpoint's `architectures` name -> the class that builds it.

A vision-language checkpoint names its text architecture in its nested `llm_config` / `text_config`;
its language model is built from TEXT_MODELS like any other.
"""

from __future__ import annotations

from nanovl.config import CheckpointConfig
from nanovl.errors import CheckpointError
from nanovl.models.llama import LlamaForCausalLM
from nanovl.models.nemotron_h import NemotronHForCausalLM
from nanovl.models.qwen2 import Qwen2ForCausalLM

TEXT_MODELS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "NemotronHForCausalLM": NemotronHForCausalLM,
}

# Vision-language checkpoints whose language model nanovl can load (keys under `language_model.`).
VLM_ARCHITECTURES = ("Llama_Nemotron_Nano_VL", "NVLM_D")


def supported_architectures() -> list[str]:
    return sorted(TEXT_MODELS) + list(VLM_ARCHITECTURES)


def text_model_class(cfg: CheckpointConfig):
    known = cfg.architecture in TEXT_MODELS or cfg.architecture in VLM_ARCHITECTURES
    cls = TEXT_MODELS.get(cfg.text.architecture)
    if not known or cls is None:
        name = cfg.architecture if not known else f"{cfg.architecture} (text model {cfg.text.architecture})"
        raise CheckpointError(f"unsupported architecture {name}; supported: {', '.join(supported_architectures())}")
    return cls
