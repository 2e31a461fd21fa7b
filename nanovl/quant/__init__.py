"""Quantized checkpoints: the formats nanovl reads and writes, as module swaps the model files never see.

- One module per format holds its Linear, its config reader and, where nanovl writes the format, its
  writer (the layers' tensors and the config file): fp8.py (ModelOpt FP8), nvfp4.py (ModelOpt NVFP4),
  awq.py (AutoAWQ int4 GEMM), int8.py (compressed-tensors W8A8). int8_embeddings.py is nanovl's
  extension that goes with any of them. calibrate.py holds what the writers share (calibration data,
  the quality report), write.py the flows of writing a checkpoint folder (loading the source, the
  folder, the reload and report; `WRITERS`), prepack.py the CPU-only repacking of weights at load.
- FORMATS below drives all three uses: loading (which reader, which Linear, which marker tensor),
  `nanovl quantize` and its `--method` choices (`METHODS`, the formats with a writer).
- The scheme is read from the checkpoint (`hf_quant_config.json`, or `quantization_config` in
  config.json), never guessed; an unknown method or algorithm is refused by name, with the supported ones.
- Which Linear layers are quantized is read from the tensors themselves: a layer whose checkpoint has
  the format's marker (`weight_scale` for ModelOpt and INT8, `qweight` for AWQ) becomes a quantized
  module; the config's `exclude_modules` / `ignore` / `modules_to_not_convert` patterns must agree. The
  releases keep the vision tower unquantized; a checkpoint whose vision tower or projector carries
  quantized tensors (`nanovl quantize --include-vision`) gets them swapped the same way.
- Weights stay at their stored size (fp8, packed 4-bit, int8, int32 words); each forward dequantizes one
  layer's weight to the activation dtype and multiplies (INT8: an int8 product), so no full-precision
  copy of the model ever exists. The tensor layouts are in each format's module docstring (sources:
  ARCHITECTURE.md section 9).
- Imports go one way: checkpoint.py imports this package (the Linears and readers); write.py
  imports checkpoint.py to load the source and reload the result; no format module imports either.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from nanovl.errors import CheckpointError
from nanovl.quant import awq, fp8, int8, nvfp4


@dataclass(frozen=True)
class Format:
    name: str  # the algorithm as configs and errors spell it
    quant_method: str  # the config that declares it: modelopt (hf_quant_config.json too), awq, compressed-tensors
    read: Callable[[dict], tuple]  # that config -> (name, exclude patterns, group size or None)
    linear: type[nn.Module]  # built empty on meta as (in_features, out_features, bias[, group]); loading fills it
    marker: str  # the tensor a quantized layer has in the checkpoint and a plain one lacks
    group_size: int | None = None  # grouped formats only: the default when the config gives none
    method: str | None = None  # `nanovl quantize --method` name, where nanovl writes the format (write.py)
    about: str = ""  # for the CLI's help


FORMATS = {f.name: f for f in (
    Format("FP8", "modelopt", fp8.read_config, fp8.FP8Linear, "weight_scale",
           method="fp8", about="ModelOpt FP8"),
    Format("NVFP4", "modelopt", fp8.read_config, nvfp4.NVFP4Linear, "weight_scale", group_size=16),
    Format("AWQ", "awq", awq.read_config, awq.AWQLinear, "qweight", group_size=128,
           method="awq", about="AutoAWQ int4"),
    Format("INT8", "compressed-tensors", int8.read_config, int8.Int8Linear, "weight_scale",
           method="int8", about="compressed-tensors W8A8"),
)}  # fmt: skip
METHODS = {f.method: f for f in FORMATS.values() if f.method}  # `nanovl quantize --method` choices


def quantization_section(model_dir: str | Path, raw: dict) -> tuple[str, dict] | None:
    """(quant_method, the quantization config) of a checkpoint, or None when it is not quantized."""
    path = Path(model_dir) / "hf_quant_config.json"
    if path.is_file():
        return "modelopt", json.loads(path.read_text()).get("quantization", {})
    q = raw.get("quantization_config")
    if isinstance(q, dict):
        return str(q.get("quant_method", "")).lower(), q
    return None


def read_quant_config(model_dir: str | Path, raw: dict) -> dict | None:
    """{"algo": a FORMATS name, "group_size": int | None, "exclude": [patterns], "int8_embeddings": bool}
    or None."""
    section = quantization_section(model_dir, raw)
    if section is None:
        return None
    method, q = section
    readers = {f.quant_method: f.read for f in FORMATS.values()}
    if method not in readers:
        known = {}
        for f in FORMATS.values():
            known.setdefault(f.quant_method, []).append(f.name)
        supported = ", ".join(f"{m} {'/'.join(names)}" for m, names in known.items())
        raise CheckpointError(f"quantization method {method!r} is not supported (supported: {supported})")
    algo, exclude, group = readers[method](q)
    fmt = FORMATS.get(algo)
    if fmt is None:
        raise CheckpointError(f"quantization algorithm {algo!r} is not supported (supported: {', '.join(FORMATS)})")
    int8_embeddings = bool(q.get("nanovl_int8_embeddings", False))
    return {"algo": algo, "group_size": group or fmt.group_size, "exclude": list(exclude),
            "int8_embeddings": int8_embeddings}  # fmt: skip


def swap_quantized_linears(model: nn.Module, qcfg: dict, keys: set[str], prefix: str = "") -> int:
    """Replace, in place, every nn.Linear whose checkpoint tensors are quantized. Returns the count."""
    fmt, n = FORMATS[qcfg["algo"]], 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is not nn.Linear or f"{prefix}{full}.{fmt.marker}" not in keys:
                continue
            excluded = [p for p in qcfg["exclude"] if fnmatch.fnmatch(full, p) or fnmatch.fnmatch(prefix + full, p)]
            if excluded:
                raise CheckpointError(
                    f"{prefix}{full} has quantized tensors but the config excludes it ({excluded[0]})"
                )
            group = (qcfg["group_size"],) if fmt.group_size else ()
            setattr(parent, name, fmt.linear(child.in_features, child.out_features, child.bias is not None, *group))
            n += 1
    if n == 0:
        raise CheckpointError(f"the config says {qcfg['algo']}, but no tensor carries {fmt.marker}: not quantized")
    return n
