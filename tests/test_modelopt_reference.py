"""nanovl's FP8 and AWQ int4 writers against NVIDIA ModelOpt's CPU fake quantization, an independent
implementation, on a small Llama trained here (the trained_llama fixture in conftest.py).

Where the two differ by design:
- FP8: ModelOpt's FP8_DEFAULT_CFG also fake-quantizes activations with the calibrated per-tensor
  input amax; nanovl stores the same input_scale (amax / 448) in the checkpoint but its CPU FP8Linear
  multiplies bf16/fp32 activations by the dequantized weight. The weight scales, the input scales and
  the fake-quantized weights must agree; logits are compared with ModelOpt's input quantizers off.
- INT4 AWQ: ModelOpt's INT4_AWQ_CFG is symmetric per block of 128 (no zero point) with its awq_lite
  search (scales from activation and weight statistics, alpha on a 0.1 grid); nanovl writes AutoAWQ's
  asymmetric GEMM layout (zero points) after its own search (activation means, alpha on a 1/20 grid).
  So the weights differ; the test holds nanovl to ModelOpt's held-out perplexity instead.
"""

import math

import modelopt.torch.quantization as mtq
import pytest
import torch

from nanovl.checkpoint import load_text_model
from nanovl.quant.calibrate import calibration_texts
from nanovl.quant.write import quantize_awq, quantize_fp8
from nanovl.tokenizer import Tokenizer

SAMPLES = 8  # ModelOpt's fake quantization is slow on CPU (awq_lite ~2 s per calibration batch here)


def batches(model_dir, calibration, held: bool = False):
    calib, held_out = calibration_texts(str(calibration), SAMPLES)
    tok = Tokenizer(model_dir)
    return [torch.tensor([tok.encode(t)]) for t in (held_out if held else calib)]


def perplexity(model, data) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in data:
            logits = model(ids)[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    return math.exp(nll / n)


def test_fp8_scales_and_weights_match_modelopt(trained_llama, tmp_path):
    model_dir, calibration = trained_llama
    quantize_fp8(str(model_dir), str(tmp_path / "fp8"), str(calibration), SAMPLES)
    ours, _ = load_text_model(tmp_path / "fp8", dtype="float32")
    ref, _ = load_text_model(model_dir, dtype="float32")
    data = batches(model_dir, calibration)
    mtq.quantize(ref, mtq.FP8_DEFAULT_CFG, forward_loop=lambda m: [m(b) for b in data])
    checked = 0
    for name, m in ref.named_modules():
        if not hasattr(m, "weight_quantizer") or not m.weight_quantizer.is_enabled:
            continue
        q = ours.get_submodule(name)
        assert float(q.weight_scale) * 448 == pytest.approx(float(m.weight_quantizer.amax), rel=1e-6), name
        assert float(q.input_scale) * 448 == pytest.approx(float(m.input_quantizer.amax), rel=1e-6), name
        with torch.no_grad():
            want = m.weight_quantizer(m.weight)
        assert torch.allclose(q.dequantized(torch.float32), want, rtol=0, atol=1e-7), name
        checked += 1
    assert checked == 7 * ours.config.num_hidden_layers  # q k v o gate up down; lm_head stays, as in ModelOpt
    mtq.disable_quantizer(ref, "*input_quantizer")
    held = batches(model_dir, calibration, held=True)
    with torch.no_grad():
        for ids in held:
            assert torch.allclose(ours(ids), ref(ids), atol=1e-4)


def test_awq_int4_is_as_good_as_modelopt(trained_llama, tmp_path):
    model_dir, calibration = trained_llama
    report = quantize_awq(str(model_dir), str(tmp_path / "awq"), str(calibration), SAMPLES, group=128)
    ours, _ = load_text_model(tmp_path / "awq", dtype="float32")
    ref, _ = load_text_model(model_dir, dtype="float32")
    data, held = batches(model_dir, calibration), batches(model_dir, calibration, held=True)
    mtq.quantize(ref, mtq.INT4_AWQ_CFG, forward_loop=lambda m: [m(b) for b in data])
    ours_ppl, ref_ppl = perplexity(ours, held), perplexity(ref, held)
    assert ours_ppl == pytest.approx(report["perplexity_quantized"], rel=1e-3)
    print(f"held-out perplexity: bf16 {report['perplexity_original']:.4f}, nanovl AWQ {ours_ppl:.4f}, "
          f"ModelOpt INT4_AWQ {ref_ppl:.4f}")  # fmt: skip
    assert ours_ppl <= ref_ppl * 1.02
