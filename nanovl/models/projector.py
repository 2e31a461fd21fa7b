"""Between the vision encoder and the LLM: pixel shuffle, then the `mlp1` projector.

Pixel shuffle (ratio 0.5) turns a (h x w) grid of C-wide patch features into (h/2 x w/2) tokens of
4C: for version "v2" the token at (r, c) is the concatenation of the 2x2 block
[(2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1)] of input patches, row-major; "v1" leaves the
output grid transposed (column-major). This is the InternVL reshape/permute sequence, written out.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanovl.models.layers import RMSNorm


def pixel_shuffle(x: torch.Tensor, ratio: float = 0.5, version: str = "v2") -> torch.Tensor:
    """x: (N, h*w, C) patch features of a square grid -> (N, h*w*ratio^2, C/ratio^2)."""
    length, c = int(x.shape[1]), int(x.shape[2])  # static for a tile size; N stays free (-1: ONNX export)
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"pixel shuffle needs a square patch grid, got {length} tokens")
    s = int(round(1 / ratio))
    x = x.view(-1, side, side // s, c * s)  # (N, rows, cols/s, s*C): pairs of neighbouring columns
    x = x.permute(0, 2, 1, 3).contiguous()  # (N, cols/s, rows, s*C)
    x = x.view(-1, side // s, side // s, c * s * s)  # (N, cols/s, rows/s, s*s*C): pairs of rows too
    if version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()  # back to row-major (N, rows/s, cols/s, 4C)
    elif version != "v1":
        raise ValueError(f"unknown pixel shuffle version {version!r} (v1 or v2)")
    return x.reshape(-1, (side // s) ** 2, c * s * s)


def mlp1_nano_vl(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    """Llama-3.1-Nemotron-Nano-VL-8B-V1: LayerNorm -> Linear -> GELU -> Linear, all with bias."""
    return nn.Sequential(nn.LayerNorm(dim_in), nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))


def mlp1_nvlm(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    """NVLM-D-72B: LayerNorm -> Linear -> GELU -> Linear, linear layers without bias."""
    return nn.Sequential(
        nn.LayerNorm(dim_in), nn.Linear(dim_in, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim_out, bias=False)
    )


class ReluSquared(nn.Module):
    def forward(self, x):
        return torch.relu(x).square()


def mlp1_nano_vl_v2(dim_in: int, hidden: int, dim_out: int, eps: float = 1e-5) -> nn.Sequential:
    """NVIDIA-Nemotron-Nano-VL-12B-V2: RMSNorm -> Linear -> ReLU^2 -> Linear, no biases."""
    return nn.Sequential(
        RMSNorm(dim_in, eps),
        nn.Linear(dim_in, hidden, bias=False),
        ReluSquared(),
        nn.Linear(hidden, dim_out, bias=False),
    )
