"""Llama-3.1 decoder (the language model of Llama-3.1-Nemotron-Nano-VL-8B-V1).

- Module names mirror the HF checkpoint (`model.layers.N.self_attn.q_proj`, `lm_head`), so the weight
  table is the identity plus a prefix.
- Pre-norm blocks: x += attn(rmsnorm(x)); x += swiglu(rmsnorm(x)); final RMSNorm; untied or tied lm_head.
- GQA through SDPA's `enable_gqa`; rotary with `llama3` scaling (layers.rope_inv_freq).
- The model computes logits from token ids (or ready-made input embeddings, which the VLM uses);
  the engine owns the loop, the cache and the sampling.
"""

from __future__ import annotations

import torch
from torch import nn

from nanovl.config import TextConfig
from nanovl.models.cache import KVCache, SlotCache
from nanovl.models.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding, output_positions


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.self_attn = Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, qkv_bias, o_bias
        )
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, layer, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, cfg: TextConfig, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, qkv_bias, o_bias) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim)


class LlamaForCausalLM(nn.Module):
    recurrent = False  # no state beyond the KV cache: prompts may share a padded or packed row

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        qkv_bias, o_bias = self.attention_biases(cfg)
        self.model = DecoderModel(cfg, qkv_bias, o_bias)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    @staticmethod
    def attention_biases(cfg: TextConfig) -> tuple[bool, bool]:
        # Llama's `attention_bias` covers q, k, v and o alike.
        return cfg.attention_bias, cfg.attention_bias

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype  # not the embedding's: that one may be int8

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def make_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.for_model(self.config, batch, max_len, self.dtype, self.device)

    def make_slot_cache(self, slots: int, max_len: int) -> SlotCache:
        return SlotCache(self.config, slots, max_len, self.dtype, self.device)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)  # (B, T, C)

    def forward(
        self,
        tokens=None,
        positions=None,
        cache=None,
        mask=None,
        embeds=None,
        last_only=False,
        valid=None,
        last_index=None,
    ):
        """tokens: (B, T) ids, or embeds: (B, T, C). positions: (B, T), default cache.pos + arange(T).
        mask: optional (B, 1, T, S) bool over the cache (True = attend). valid: (B, T) real-token mask,
        unused here (positions and `mask` already hide padding). Returns logits (B, T or 1, V)."""
        x = self.embed(tokens) if embeds is None else embeds
        B, T, _ = x.shape
        if positions is None:
            start = cache.pos if cache is not None else 0
            positions = torch.arange(start, start + T, device=x.device).expand(B, T)
        cos, sin = self.model.rotary(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.advance(T)
        x = output_positions(x, last_only, last_index)
        return self.lm_head(self.model.norm(x))
