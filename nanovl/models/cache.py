"""Preallocated caches: keys/values of attention layers, and the conv / SSM state of Mamba layers.

- `KVCache` / `HybridCache` (engine/generate.py): the prompts of a batch are left-padded to one
  length, so all rows write the same slot each step and `pos` is shared; the engine masks the
  padding slots.
- `SlotCache` (engine/scheduler.py): each request owns a slot with its own length; a forward runs on
  the slots in use, each at its own position, masked to its own keys.
- `update` writes in place and returns views up to the filled length, so attention never reads
  unused slots and nothing grows by concatenation. The layer pattern comes from the config
  (`cfg.pattern`: "*" attention, "M" Mamba).
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

    def advance(self, n: int):
        self.pos += n

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

    def advance(self, n: int):
        self.kv.pos += n

    def mamba_state(self, layer: int):
        """(conv state (B, conv_dim, kernel-1), SSM state (B, heads, head_dim, state)) of a Mamba layer."""
        j = self.mamba_slot[layer]
        return self.conv[j], self.ssm[j]

    def set_mamba_state(self, layer: int, conv, ssm):
        j = self.mamba_slot[layer]
        self.conv[j], self.ssm[j] = conv, ssm

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.conv.numel() * self.conv.element_size() + self.ssm.numel() * 4


class SlotCache:
    """Continuous batching: each request owns a slot of fixed capacity, with its own length; a forward
    runs on the slots in `rows` (set with `use`), each at its own position. Serves Llama-style models
    (every layer attends) and Nemotron-H (attention and Mamba layers by the pattern)."""

    def __init__(self, cfg, slots: int, max_len: int, dtype, device=None):
        attn = [i for i, c in enumerate(cfg.pattern) if c == "*"]
        mamba = [i for i, c in enumerate(cfg.pattern) if c == "M"]
        self.kv_slot = {layer: j for j, layer in enumerate(attn)}
        self.mamba_slot = {layer: j for j, layer in enumerate(mamba)}
        shape = (len(attn), slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        if mamba:
            conv_dim = cfg.mamba_num_heads * cfg.mamba_head_dim + 2 * cfg.n_groups * cfg.ssm_state_size
            self.conv = torch.zeros(len(mamba), slots, conv_dim, cfg.conv_kernel - 1, dtype=dtype, device=device)
            heads = (cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size)
            self.ssm = torch.zeros(len(mamba), slots, *heads, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.max_len = max_len
        self.rows = torch.zeros(0, dtype=torch.long, device=device)
        self.advance_by: torch.Tensor | None = None  # per-row real lengths of a right-padded forward

    def use(self, rows: list[int]):
        self.rows = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)

    def reset(self, slot: int):
        self.lengths[slot] = 0
        if self.mamba_slot:
            self.conv[:, slot] = 0
            self.ssm[:, slot] = 0

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) positions of the next T tokens of each row."""
        return self.lengths[self.rows][:, None] + torch.arange(T, device=self.lengths.device)

    def attention_mask(self, T: int) -> torch.Tensor:
        """(B, 1, T, S) bool: each row's own keys, causally, up to the longest row."""
        ends = self.lengths[self.rows] + T  # (B,)
        S = int(ends.max())
        if S > self.max_len:
            raise RuntimeError(f"slot overflow: {S} > {self.max_len}")
        keys = torch.arange(S, device=ends.device)
        queries = self.positions(T)  # (B, T)
        return (keys[None, None, :] <= queries[:, :, None])[:, None]

    def update(self, layer: int, k, v):
        # k, v: (B, Hkv, T, D) for the rows -> their keys / values (B, Hkv, S, D)
        j, T = self.kv_slot[layer], k.shape[2]
        pos = self.positions(T)  # (B, T)
        self.k[j][self.rows[:, None], :, pos] = k.transpose(1, 2)
        self.v[j][self.rows[:, None], :, pos] = v.transpose(1, 2)
        S = int((self.lengths[self.rows] + T).max())
        return self.k[j][self.rows, :, :S], self.v[j][self.rows, :, :S]

    def advance(self, n: int):
        self.lengths[self.rows] += n if self.advance_by is None else self.advance_by

    def mamba_state(self, layer: int):
        j = self.mamba_slot[layer]
        return self.conv[j][self.rows], self.ssm[j][self.rows]

    def set_mamba_state(self, layer: int, conv, ssm):
        j = self.mamba_slot[layer]
        self.conv[j][self.rows] = conv
        self.ssm[j][self.rows] = ssm

    @property
    def nbytes(self) -> int:
        total = 2 * self.k.numel() * self.k.element_size()
        if self.mamba_slot:
            total += self.conv.numel() * self.conv.element_size() + self.ssm.numel() * 4
        return total
