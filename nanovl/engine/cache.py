"""A preallocated KV cache for every attention layer of a batch.

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
