"""ModelOpt NVFP4: 4-bit E2M1 weights in blocks of 16 with fp8 block scales. Read only (nanovl writes none).

- Layout, as ModelOpt exports it: `weight` uint8 [out, in/2], two E2M1 values per byte, the even
  element in the low nibble; `weight_scale` float8_e4m3fn [out, in/16] (one per block); `weight_scale_2`
  fp32 scalar; `input_scale` fp32 scalar (kept, unused by this weight-only path);
  w = e2m1 * block scale * weight_scale_2.
- The config is ModelOpt's, as for FP8 (fp8.read_config), with quant_algo NVFP4 and group_size 16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovl.errors import CheckpointError

# the 16 E2M1 codes: bit 3 the sign, bits 0-2 the magnitude
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


class NVFP4Linear(nn.Module):
    def __init__(self, inp: int, out: int, bias: bool, group: int = 16):
        super().__init__()
        if inp % group:
            raise CheckpointError(f"NVFP4 needs in_features divisible by {group}, got {inp}")
        self.group = group
        self.register_buffer("weight", torch.empty(out, inp // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.empty(out, inp // group, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale_2", torch.empty((), dtype=torch.float32))
        self.register_buffer("input_scale", torch.empty((), dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    def dequantized(self, dtype) -> torch.Tensor:
        out, half = self.weight.shape
        nibbles = torch.stack([self.weight & 0xF, self.weight >> 4], dim=-1).reshape(out, 2 * half)  # (out, in)
        values = E2M1.to(self.weight.device)[nibbles.long()]
        scales = self.weight_scale.to(torch.float32).repeat_interleave(self.group, dim=1) * self.weight_scale_2
        return (values * scales).to(dtype)

    def forward(self, x):
        return F.linear(x, self.dequantized(x.dtype), self.bias)
