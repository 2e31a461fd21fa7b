"""The measured CPU compute dtype (nanovl/cpu.py): the verdict is kept per host, the override works, and
UpcastLinear computes many rows in fp32 from the bf16 weights and leaves few rows on the bf16 path."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanovl import cpu


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOVL_CACHE", str(tmp_path))
    monkeypatch.delenv("NANOVL_CPU_DTYPE", raising=False)
    cpu.compute_dtype.cache_clear()
    yield tmp_path
    cpu.compute_dtype.cache_clear()


def test_measured_once_and_stored(fresh, monkeypatch):
    rates = {torch.bfloat16: 10.0, torch.float32: 50.0}
    calls = []
    monkeypatch.setattr(cpu, "linear_rate", lambda dtype: calls.append(dtype) or rates[dtype])
    assert cpu.compute_dtype() == torch.float32
    (entry,) = json.loads((fresh / "cpu.json").read_text()).values()
    assert entry == {"dtype": "float32", "gflops": {"bfloat16": 10.0, "float32": 50.0}}
    cpu.compute_dtype.cache_clear()
    rates[torch.bfloat16] = 99.0  # a new measurement would now pick bf16: the stored verdict is kept
    assert cpu.compute_dtype() == torch.float32 and len(calls) == 2


def test_override(fresh, monkeypatch):
    monkeypatch.setenv("NANOVL_CPU_DTYPE", "bfloat16")
    assert cpu.compute_dtype() == torch.bfloat16
    cpu.compute_dtype.cache_clear()
    monkeypatch.setenv("NANOVL_CPU_DTYPE", "fp16")
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        cpu.compute_dtype()


def test_linear_rate_is_positive():
    assert cpu.linear_rate(torch.float32, rows=8, k=16, n=16, repeats=1) > 0


def test_upcast_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32, bias=False)).bfloat16()
    long, short = torch.randn(2, 40, 64).bfloat16(), torch.randn(3, 64).bfloat16()
    bf16_short = model(short)
    assert cpu.upcast_linears(model) == 2
    out_long, out_short = model(long), model(short)
    assert out_long.dtype == torch.bfloat16 and out_long.shape == (2, 40, 32)
    assert torch.equal(out_short, bf16_short)  # few rows: the bf16 path, unchanged
    # many rows: each layer computed in fp32 from the bf16 weights, its output rounded to bf16
    w0, b0, w2 = (t.float() for t in (model[0].weight, model[0].bias, model[2].weight))
    h = F.gelu(F.linear(long.float(), w0, b0).bfloat16())
    assert torch.equal(out_long, F.linear(h.float(), w2).bfloat16())
