"""Which dtype this CPU computes fastest in, measured once per host, and the swaps that use it.

Flags do not settle it. Three 2-vCPU hosts measured for issue #20 (BENCHMARKS.md):
- an Intel Xeon with avx512_bf16 and no AMX: fp32 matmuls faster than bf16 (237 against 140 GFLOP/s);
- an AMD EPYC with the same flags: bf16 4x faster than fp32 (739 against 184);
- an AMD EPYC with AVX2 only: bf16 about 8x slower than fp32 (oneDNN has no bf16 kernel there).

So `compute_dtype()` times one F.linear of an encoder layer's shape in bf16 and in fp32 and keeps the
faster. The verdict is stored per host (CPU model, flags, torch version, threads) in
`$NANOVL_CACHE` (default `~/.cache/nanovl`)/cpu.json, so every later load on the host makes the same
choice at no cost. `NANOVL_CPU_DTYPE=bfloat16|float32` overrides it.

Where it is used, only when the user left `--dtype auto` and the checkpoint is bf16 (checkpoint.py, at load):
- the vision encoder and projector run in the faster dtype (their weights converted at load: 0.65 B
  parameters for C-RADIOv2-H, 2.6 GB in fp32);
- the LLM keeps its bf16 weights (an 8B in fp32 would not fit most hosts), and where fp32 is faster
  its Linear layers become `UpcastLinear`: a prefill chunk (64 rows or more) is computed in fp32 from
  a per-call fp32 copy of the weight, while decoding (a few rows, bound by reading the weights) stays
  in bf16, half the bytes.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanovl.quant.prepack import bf16_linears

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@functools.cache
def cpu_info() -> dict:
    """The CPU's model name and the /proc/cpuinfo flags that decide which kernels exist."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[:64]) if v}
    flags = set(field.get("flags", "").split())
    return {"model": field.get("model name", "unknown"), "flags": [f for f in FLAGS if f in flags]}


def linear_rate(dtype: torch.dtype, rows: int = 256, k: int = 1280, n: int = 1280, repeats: int = 3) -> float:
    """GFLOP/s of the best of `repeats` F.linear calls of (rows, k) x (n, k) in `dtype`."""
    x, w = torch.randn(rows, k).to(dtype), torch.randn(n, k).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        F.linear(x, w)  # warm-up: the kernel library picks its kernel
        for _ in range(repeats):
            t0 = time.perf_counter()
            F.linear(x, w)
            best = min(best, time.perf_counter() - t0)
    return 2 * rows * k * n / best / 1e9


def _cache_file() -> Path:
    return Path(os.environ.get("NANOVL_CACHE") or Path.home() / ".cache" / "nanovl") / "cpu.json"


@functools.cache
def compute_dtype() -> torch.dtype:
    """bf16 or fp32, whichever this host's matmul runs faster in (measured once, then read back)."""
    forced = os.environ.get("NANOVL_CPU_DTYPE")
    if forced:
        if forced not in DTYPES:
            raise ValueError(f"NANOVL_CPU_DTYPE must be bfloat16 or float32, not {forced!r}")
        return DTYPES[forced]
    info = cpu_info()
    key = f"{info['model']} | {' '.join(info['flags'])} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = _cache_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        rates = {name: linear_rate(dtype) for name, dtype in DTYPES.items()}
        known[key] = {"dtype": max(rates, key=rates.get), "gflops": {k: round(v, 1) for k, v in rates.items()}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(known, indent=1))
        except OSError:
            pass  # a read-only home: measured again next time, same choice
    return DTYPES[known[key]["dtype"]]


class UpcastLinear(nn.Module):
    """A bf16 Linear for hosts where fp32 matmuls are faster: inputs of `min_rows` rows or more are
    computed in fp32 (the weight converted per call, a small cost next to a prefill chunk's matmul),
    fewer rows in bf16 as before. The output keeps the input's dtype."""

    def __init__(self, linear: nn.Linear, min_rows: int = 64):
        super().__init__()
        self.weight, self.bias, self.min_rows = linear.weight, linear.bias, min_rows
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        if x.numel() // x.shape[-1] < self.min_rows:
            return F.linear(x, self.weight, self.bias)
        w = torch.empty(self.weight.shape).copy_(self.weight)  # copy_ converts on all threads
        b = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), w, b).to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, min_rows={self.min_rows}"


def upcast_linears(model: nn.Module) -> int:
    """Swap every bf16 nn.Linear of `model` for an UpcastLinear, in place; returns how many."""
    targets = bf16_linears(model)
    for parent, name, child in targets:
        setattr(parent, name, UpcastLinear(child))
    return len(targets)
