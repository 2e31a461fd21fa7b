"""Primitives shared by the decoders: RMSNorm, rotary embedding, GQA attention over a cache, SwiGLU MLP.

- RMSNorm normalises in fp32 and casts back before the weight, as the HF Llama/Qwen2 code does, so
  bf16 outputs round the same way.
- Rotary uses the "rotate half" layout of HF checkpoints (q/k weights are stored permuted for it).
  `llama3` scaling follows Meta's Llama-3.1 rule: wavelengths longer than
  original_max_position / low_freq_factor are divided by `factor`, shorter than
  original_max_position / high_freq_factor are kept, and the band between is interpolated smoothly.
- Attention reads and writes an explicit cache object (`update(layer, k, v) -> (k_all, v_all)`,
  models/cache.py), made by the model and passed in by the engine; the model never grows state by
  concatenation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanovl.config import RopeConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        old_ctx = rope.original_max_position_embeddings
        low_wavelen = old_ctx / rope.low_freq_factor  # longer than this: fully scaled
        high_wavelen = old_ctx / rope.high_freq_factor  # shorter than this: unchanged
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        out = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, out)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. inv_freq is a plain attribute made on first use, so a
    model built on the meta device needs no buffer materialisation after loading."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        self.rope, self.head_dim = rope, head_dim
        self._inv_freq: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        # positions: (B, T) int64 -> cos, sin: (B, 1, T, head_dim)
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            self._inv_freq = rope_inv_freq(self.rope, self.head_dim).to(positions.device)
        freqs = positions[..., None].float() * self._inv_freq  # (B, T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rotary(x, cos, sin):
    # x: (B, H, T, D); rotate_half pairs dimension i with i + D/2
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=o_bias)

    def forward(self, x, cos, sin, cache=None, layer: int = 0, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, D), S = cached + T
        # Without a mask: plain causal when the query block starts at 0, nothing to hide for one token.
        causal = mask is None and T > 1
        if causal and k.shape[2] != T:
            mask, causal = causal_mask(T, k.shape[2], x.device), False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.kv_heads != self.heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """(T, S) bool, True = may attend: query t sits at key position S - T + t."""
    q = torch.arange(S - T, S, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= q


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """The ViT MLP: fc2(gelu(fc1(x))), exact-erf GELU, with biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        if getattr(self.fc1, "fuses_gelu", False):  # prepacked for CPU (quant/prepack.py): GELU inside the matmul
            return self.fc2(self.fc1(x, post="gelu"))
        return self.fc2(F.gelu(self.fc1(x)))


def output_positions(x: torch.Tensor, last_only: bool, last_index: torch.Tensor | None) -> torch.Tensor:
    """The hidden states the lm_head needs: all, the last, or each row's own last (right-padded)."""
    if last_index is not None:  # (B,)
        return x[torch.arange(x.shape[0], device=x.device), last_index][:, None]
    return x[:, -1:] if last_only else x
