"""ModelOpt FP8: per-tensor scaled float8 weights; the Linear, ModelOpt's config reader, the writer.

- Layout, as ModelOpt exports it: `weight` float8_e4m3fn [out, in], `weight_scale` fp32 scalar,
  `input_scale` fp32 scalar; w = weight * weight_scale.
- `input_scale` is kept (and written: the largest |activation| entering the layer on calibration text,
  / 448) so the checkpoint serves engines that quantize activations; this weight-only path does not.
- The config is `hf_quant_config.json` ({"quantization": {"quant_algo", "exclude_modules", ...}}) or
  config.json's `quantization_config` with quant_method modelopt (`ignore` for the exclusions); NVFP4
  checkpoints carry the same config, so its reader is this one.
- Written weights: weight_scale = max|W| / 448, the largest finite e4m3 value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from nanovl.quant.calibrate import calibration_pixels, input_absmax

if TYPE_CHECKING:
    from nanovl.quant.source import Source

FP8_MAX = 448.0


class FP8Linear(nn.Module):
    def __init__(self, inp: int, out: int, bias: bool):
        super().__init__()
        self.register_buffer("weight", torch.empty(out, inp, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.empty((), dtype=torch.float32))
        self.register_buffer("input_scale", torch.empty((), dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    def dequantized(self, dtype) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.weight_scale).to(dtype)

    def forward(self, x):
        return F.linear(x, self.dequantized(x.dtype), self.bias)


def read_config(q: dict) -> tuple[str, list[str], int | None]:
    """ModelOpt's quantization config -> (quant_algo, exclude patterns, group size). hf_quant_config.json's
    section has no quant_method and names its exclusions exclude_modules; config.json's names them ignore."""
    exclude = q.get("ignore") if "quant_method" in q else q.get("exclude_modules")
    return q.get("quant_algo"), exclude or [], q.get("group_size")


def fp8_tensors(name: str, w: torch.Tensor, input_absmax: float) -> dict[str, torch.Tensor]:
    """A (out, in) weight in ModelOpt's FP8 layout, under the layer's name."""
    scale = (w.abs().max() / FP8_MAX).clamp(min=1e-12)
    return {
        f"{name}.weight": (w / scale).to(torch.float8_e4m3fn),
        f"{name}.weight_scale": scale.reshape(()),
        f"{name}.input_scale": torch.tensor(max(input_absmax, 1e-12) / FP8_MAX),
    }


def layer_state(src: Source, targets: dict[str, nn.Linear], calib: list[str], samples: int, vision: bool) -> dict:
    """The target layers' FP8 tensors, input scales calibrated on the text (and, vision: on synthetic
    pages for the vision tower's and the projector's layers)."""
    linears = {n: m for n, m in src.lm.named_modules() if isinstance(m, nn.Linear)}
    absmax = {src.prefix + k: v for k, v in input_absmax(src.lm, linears, src.tokens(calib)).items()}
    if vision:
        vision_targets = {k: m for k, m in targets.items() if not k.startswith("language_model.")}
        pixels = calibration_pixels(src.root, max(2, samples // 8))
        absmax.update(input_absmax(src.root.encode_images, vision_targets, pixels.split(4)))
    state = {}
    for name, module in targets.items():
        state.update(fp8_tensors(name, module.weight.detach(), absmax.get(name, 0.0)))
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach()
    return state


def config_files(src: Source, include_vision: bool, int8_embeddings: bool) -> dict[str, dict]:
    exclude = src.exclude_patterns(include_vision, int8_embeddings)
    extension = {"nanovl_int8_embeddings": True} if int8_embeddings else {}
    quant = {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": exclude, **extension}
    return {"hf_quant_config.json": {"producer": {"name": "nanovl"}, "quantization": quant}}
