"""INT8 W8A8 in the compressed-tensors layout (as vLLM reads it): the Linear, its config reader, the writer.

- Layout: `weight` int8 [out, in], `weight_scale` fp32 [out, 1] (symmetric, one scale per output
  channel); w = weight * weight_scale. No activation scales are stored: activations are quantized per
  token at run time.
- The product runs in int32 through `torch._int_mm` (AMX / VNNI on these CPUs) and is rescaled to the
  input dtype, so the weights are never dequantized.
- The config: `quantization_config` with quant_method compressed-tensors, one config group of int8
  per-channel weights with dynamic int8 input activations; any other scheme is refused. Its `ignore`
  lists the layers left as they are.
- `int8_rows` (symmetric per-row rounding) and `int8_linear` also serve the int8 embedding extension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from nanovl.errors import CheckpointError

if TYPE_CHECKING:
    from nanovl.quant.source import Source


class Int8Linear(nn.Module):
    """int8 weights with per-output-channel scales; activations quantized per token on the fly."""

    def __init__(self, inp: int, out: int, bias: bool):
        super().__init__()
        self.register_buffer("weight", torch.empty(out, inp, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out, 1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    def dequantized(self, dtype) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.weight_scale).to(dtype)

    def forward(self, x):
        return int8_linear(x, self.weight, self.weight_scale, self.bias)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias=None) -> torch.Tensor:
    """x (..., in) @ (int8 weight (out, in) * weight_scale (out, 1)).T with x quantized per token."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    scale = (x2.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)  # (tokens, 1)
    xq = torch.round(x2 / scale).clamp(-127, 127).to(torch.int8)
    y = torch._int_mm(xq, weight.t()).float() * scale * weight_scale.t()  # (tokens, out)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], -1)


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a (rows, cols) matrix: codes int8 and scales fp32 (rows, 1)."""
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale.float()


def read_config(q: dict) -> tuple[str, list[str], None]:
    """compressed-tensors' quantization config -> ("INT8", ignore patterns, no group size)."""
    groups = list((q.get("config_groups") or {}).values())
    w = groups[0].get("weights", {}) if groups else {}
    a = (groups[0].get("input_activations") or {}) if groups else {}
    w8a8 = w.get("num_bits") == 8 and w.get("type") == "int" and w.get("strategy") == "channel"
    if len(groups) != 1 or not w8a8 or not a.get("dynamic") or a.get("num_bits") != 8:
        raise CheckpointError("compressed-tensors: only int8 per-channel weights with dynamic int8 activations")
    return "INT8", q.get("ignore") or [], None


def layer_state(src: Source, targets: dict[str, nn.Linear], calib: list[str], samples: int, vision: bool) -> dict:
    """The target layers' int8 tensors (nothing to calibrate: activation scales are dynamic)."""
    state = {}
    for name, module in targets.items():
        state[f"{name}.weight"], state[f"{name}.weight_scale"] = int8_rows(module.weight.detach())
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach()
    return state


def config_files(src: Source, include_vision: bool, int8_embeddings: bool) -> dict[str, dict]:
    """config.json with compressed-tensors' `quantization_config`."""
    from nanovl.config import read_json

    extension = {"nanovl_int8_embeddings": True} if int8_embeddings else {}
    scheme = {"targets": ["Linear"],
              "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
              "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                    "dynamic": True}}  # fmt: skip
    ignore = src.exclude_patterns(include_vision, int8_embeddings)
    cfg = read_json(src.path / "config.json")
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "int-quantized",
                                  "config_groups": {"group_0": scheme}, "ignore": ignore, **extension}  # fmt: skip
    return {"config.json": cfg}
