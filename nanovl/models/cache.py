"""Preallocated caches: keys/values of attention layers, and the conv / SSM state of Mamba layers.

Prompts in a batch are left-padded to one length, so all rows write the same slot each step and
`pos` is shared; the engine masks the padding slots. `update` writes in place and returns views up to
the filled length, so attention never reads unused slots and nothing grows by concatenation.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype, device=None):
        shape = (layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0  # slots filled so far; the model advances it after each forward

    @classmethod
    def for_model(cls, cfg, batch: int, max_len: int, dtype, device=None) -> KVCache:
        return cls(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim, max_len, dtype, device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        # k, v: (B, Hkv, T, D) -> the layer's keys/values for slots [0, pos + T)
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len} slots")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class HybridCache:
    """Nemotron-H: a KV cache for the attention layers, and for each Mamba layer its conv state (the
    last kernel-1 inputs of the depthwise convolution) and SSM state (heads x head_dim x state, fp32).
    The Mamba state has a fixed size whatever the context length."""

    def __init__(self, cfg, batch: int, max_len: int, dtype, device=None):
        attn = [i for i, c in enumerate(cfg.pattern) if c == "*"]
        mamba = [i for i, c in enumerate(cfg.pattern) if c == "M"]
        self.kv = KVCache(len(attn), batch, cfg.num_key_value_heads, cfg.head_dim, max_len, dtype, device)
        self.kv_slot = {layer: j for j, layer in enumerate(attn)}
        self.mamba_slot = {layer: j for j, layer in enumerate(mamba)}
        conv_dim = cfg.mamba_num_heads * cfg.mamba_head_dim + 2 * cfg.n_groups * cfg.ssm_state_size
        self.conv = torch.zeros(len(mamba), batch, conv_dim, cfg.conv_kernel - 1, dtype=dtype, device=device)
        self.ssm = torch.zeros(
            len(mamba), batch, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, device=device
        )

    @property
    def pos(self) -> int:
        return self.kv.pos

    @pos.setter
    def pos(self, value: int):
        self.kv.pos = value

    def update(self, layer: int, k, v):
        return self.kv.update(self.kv_slot[layer], k, v)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.conv.numel() * self.conv.element_size() + self.ssm.numel() * 4
