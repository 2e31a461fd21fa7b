"""nanovl quantize --method fp8: a ModelOpt-layout checkpoint that round-trips, with its report."""

import json

import pytest
import torch
from safetensors import safe_open

from nanovl.api import load_text_model
from nanovl.cli import main
from nanovl.quant import FP8Linear


def test_fp8_quantize_round_trip(tiny_llama, tmp_path, capsys):
    out = tmp_path / "fp8"
    assert main(["quantize", "--model", str(tiny_llama), "--method", "fp8", "--out", str(out)]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight")
        scale = f.get_tensor("model.layers.0.mlp.up_proj.weight_scale")
        assert (
            w.dtype == torch.float8_e4m3fn
            and scale.shape == ()
            and float(f.get_tensor("model.layers.0.mlp.up_proj.input_scale")) > 0
        )
        assert "lm_head.weight" in f.keys() and f.get_tensor("lm_head.weight").dtype == torch.float32
    quantized, _ = load_text_model(out, dtype="float32")
    original, _ = load_text_model(tiny_llama, dtype="float32")
    assert isinstance(quantized.model.layers[0].mlp.up_proj, FP8Linear)
    # the stored weight times its scale is the original within FP8's precision (3 mantissa bits)
    deq = quantized.model.layers[0].mlp.up_proj.dequantized(torch.float32)
    ref = original.model.layers[0].mlp.up_proj.weight
    assert (deq - ref).abs().max() <= ref.abs().max() / 448 * 32
    report = json.loads((out / "quant_report.json").read_text())
    assert report["held_out_tokens"] > 0 and abs(report["perplexity_change_percent"]) < 5
    assert report["logit_abs_error_max"] < 0.5


def test_quantize_refuses_bad_input(tiny_llama, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert main(["quantize", "--model", str(tiny_llama), "--method", "fp8", "--out", str(tmp_path / "busy")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tiny_llama), "--method", "awq", "--out", str(tmp_path / "a")]) == 1
    assert "not implemented yet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(tiny_llama), "--method", "int4", "--out", str(tmp_path / "b")])
