"""InternViT (InternViT-6B-448px-V1-5 in NVLM-D-72B).

- Conv patch embedding (kernel = stride = 14, with bias), a learned class token prepended, and a
  learned position embedding over class + patches, bicubically resized (align_corners=False) only
  when the patch grid differs from the trained one.
- Pre-norm blocks with layer scale: x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x)). The 6B uses
  RMSNorm (`norm_type: rms_norm`), no qkv bias, and QK-norm: RMSNorm over the full width of q and of
  k before the split into heads. GELU MLP with biases.
- No final norm; features are the last block's output without the class token.
Module names mirror the release keys (`encoder.layers.N.attn.qkv`, `ls1`, `embeddings.class_embedding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanovl.errors import CheckpointError
from nanovl.models.layers import GeluMLP, RMSNorm


@dataclass
class InternViTConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    norm_type: str = "rms_norm"
    qkv_bias: bool = False
    qk_normalization: bool = True

    @classmethod
    def from_hf(cls, v: dict, select_layer: int = -1) -> InternViTConfig:
        missing = [
            k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size") if k not in v
        ]
        if missing:
            raise CheckpointError(f"vision_config lacks {', '.join(missing)}")
        if v.get("norm_type", "rms_norm") not in ("rms_norm", "layer_norm"):
            raise CheckpointError(f"InternViT norm_type {v['norm_type']!r} is not supported")
        if select_layer != -1:
            raise CheckpointError(f"select_layer {select_layer} is not supported (only -1, the last layer)")
        return cls(
            hidden_size=v["hidden_size"],
            num_hidden_layers=v["num_hidden_layers"],
            num_attention_heads=v["num_attention_heads"],
            intermediate_size=v["intermediate_size"],
            image_size=v.get("image_size", 448),
            patch_size=v.get("patch_size", 14),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            norm_type=v.get("norm_type", "rms_norm"),
            qkv_bias=v.get("qkv_bias", False),
            qk_normalization=v.get("qk_normalization", False),
        )

    def norm(self, dim: int) -> nn.Module:
        return (
            RMSNorm(dim, self.layer_norm_eps)
            if self.norm_type == "rms_norm"
            else nn.LayerNorm(dim, self.layer_norm_eps)
        )


class Embeddings(nn.Module):
    def __init__(self, cfg: InternViTConfig):
        super().__init__()
        self.grid = cfg.image_size // cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.grid**2, cfg.hidden_size))

    def forward(self, x):
        patches = self.patch_embedding(x)  # (N, C, h, w)
        N, C, h, w = patches.shape
        pos = self.position_embedding
        if (h, w) != (self.grid, self.grid):
            grid = pos[:, 1:].reshape(1, self.grid, self.grid, C).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], grid.to(pos.dtype).flatten(2).transpose(1, 2)], dim=1)
        tokens = torch.cat([self.class_embedding.expand(N, -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        return tokens + pos  # (N, 1 + h*w, C)


class Attention(nn.Module):
    def __init__(self, cfg: InternViTConfig):
        super().__init__()
        c = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.qkv = nn.Linear(c, 3 * c, bias=cfg.qkv_bias)
        self.proj = nn.Linear(c, c)
        self.qk_norm = cfg.qk_normalization
        if self.qk_norm:
            self.q_norm, self.k_norm = cfg.norm(c), cfg.norm(c)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, T, C), q/k/v order as in the fused weight
        if self.qk_norm:  # over the full width, before the split into heads
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Layer(nn.Module):
    def __init__(self, cfg: InternViTConfig):
        super().__init__()
        c = cfg.hidden_size
        self.norm1, self.norm2 = cfg.norm(c), cfg.norm(c)
        self.attn = Attention(cfg)
        self.mlp = GeluMLP(c, cfg.intermediate_size)
        self.ls1 = nn.Parameter(torch.ones(c))
        self.ls2 = nn.Parameter(torch.ones(c))

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class Encoder(nn.Module):
    def __init__(self, cfg: InternViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


class InternVisionModel(nn.Module):
    """normalised pixels (N, 3, H, W) -> patch features (N, h*w, C), class token dropped."""

    def __init__(self, cfg: InternViTConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels.to(self.embeddings.patch_embedding.weight.dtype))
        for layer in self.encoder.layers:
            x = layer(x)
        return x[:, 1:]
