"""Quantized releases: hand-made ModelOpt FP8 / NVFP4 and AutoAWQ checkpoints load and match the
dequantized weights, computed here independently and run through transformers' Llama."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from nanovl.checkpoint import load_text_model
from nanovl.errors import CheckpointError
from nanovl.quant.awq import AWQLinear
from nanovl.quant.fp8 import FP8Linear
from nanovl.quant.nvfp4 import NVFP4Linear

FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def quantize_fp8(w):
    scale = w.abs().max() / 448.0
    q = (w / scale).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale.reshape(()), "input_scale": torch.tensor(1.0)}, q.float() * scale


def quantize_nvfp4(w, group=16):
    out, inp = w.shape
    g2 = w.abs().max() / (448.0 * 6.0)  # global scale: block scales fit fp8, values fit E2M1
    blocks = w.reshape(out, inp // group, group)
    bscale = (blocks.abs().amax(-1) / 6.0 / g2).to(torch.float8_e4m3fn)  # (out, in/16)
    real = bscale.float() * g2
    scaled = blocks / real.clamp(min=1e-12)[..., None]
    mags = torch.tensor(FP4_VALUES)
    idx = (scaled.abs()[..., None] - mags).abs().argmin(-1)  # nearest magnitude
    codes = (idx + 8 * (scaled < 0)).reshape(out, inp)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)  # even element in the low nibble
    deq = torch.tensor([v for v in FP4_VALUES] + [-v for v in FP4_VALUES])[codes].reshape(out, inp // group, group)
    deq = (deq * real[..., None]).reshape(out, inp)
    return {
        "weight": packed,
        "weight_scale": bscale,
        "weight_scale_2": g2.reshape(()),
        "input_scale": torch.tensor(1.0),
    }, deq


def pack_awq(values):  # (rows, cols) 0..15 -> (rows, cols/8) int32, AutoAWQ order 0 2 4 6 1 3 5 7
    rows, cols = values.shape
    v = values.reshape(rows, cols // 8, 8)
    word = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for pos, col in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
        word |= v[..., col].to(torch.int64) << (4 * pos)
    return word.to(torch.int32)  # values above 2^31 wrap, as int32 storage does


def quantize_awq(w, group=32):
    wt = w.t()  # (in, out)
    inp, out = wt.shape
    g = wt.reshape(inp // group, group, out)
    lo, hi = g.amin(1), g.amax(1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.clamp(torch.round(g / scale[:, None]) + zero[:, None], 0, 15)
    deq = ((q - zero[:, None]) * scale[:, None].half().float()).reshape(inp, out).t()
    tensors = {"qweight": pack_awq(q.reshape(inp, out).long()), "qzeros": pack_awq(zero.long()),
               "scales": scale.half()}  # fmt: skip
    return tensors, deq


SCHEMES = {
    "FP8": (quantize_fp8, {"quantization": {"quant_algo": "FP8", "exclude_modules": ["lm_head"]}}),
    "NVFP4": (
        quantize_nvfp4,
        {"quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}},
    ),
    "AWQ": (quantize_awq, None),
}


def make_quantized(src, dst, scheme):
    quantize, hf_quant = SCHEMES[scheme]
    shutil.copytree(src, dst)
    state, deq_state = load_file(src / "model.safetensors"), {}
    out = {}
    for name, t in state.items():
        if name.endswith("proj.weight") and "layers" in name:
            tensors, deq = quantize(t)
            base = name[: -len(".weight")]
            out.update({f"{base}.{k}": v.contiguous() for k, v in tensors.items()})
            deq_state[name] = deq
        else:
            out[name] = t
            deq_state[name] = t
    save_file(out, dst / "model.safetensors")
    if hf_quant:
        (dst / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    else:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                      "version": "gemm", "modules_to_not_convert": ["lm_head"]}  # fmt: skip
        (dst / "config.json").write_text(json.dumps(cfg))
    ref_dir = dst.parent / f"{dst.name}-dequantized"
    shutil.copytree(src, ref_dir)
    save_file(deq_state, ref_dir / "model.safetensors")
    return ref_dir


@pytest.mark.parametrize("scheme, cls", [("FP8", FP8Linear), ("NVFP4", NVFP4Linear), ("AWQ", AWQLinear)])
def test_quantized_checkpoint_matches_dequantized_reference(tiny_llama, tmp_path, scheme, cls):
    ref_dir = make_quantized(tiny_llama, tmp_path / scheme, scheme)
    ours, _ = load_text_model(tmp_path / scheme, dtype="float32")
    layer = ours.model.layers[0].self_attn.q_proj
    assert isinstance(layer, cls) and isinstance(ours.lm_head, torch.nn.Linear)
    stored = {"FP8": torch.float8_e4m3fn, "NVFP4": torch.uint8, "AWQ": torch.int32}[scheme]
    assert next(iter(layer.buffers())).dtype == stored  # weights stay at their stored size
    ref = LlamaForCausalLM.from_pretrained(ref_dir).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("bfloat16", 0.05)])
def test_awq_on_the_cpu_int4_kernel_matches_dequantized_reference(tiny_llama, tmp_path, dtype, tol):
    """pack=True (every inference load) repacks AWQ layers for PyTorch's CPU int4 kernel; the logits
    still match transformers on the independently dequantized weights (bf16: within its rounding)."""
    from nanovl.quant.prepack import Int4PackedLinear

    ref_dir = make_quantized(tiny_llama, tmp_path / "AWQ", "AWQ")
    ours, _ = load_text_model(tmp_path / "AWQ", dtype=dtype, pack=True)
    layer = ours.model.layers[0].mlp.down_proj
    assert isinstance(layer, Int4PackedLinear) and layer.packed.dtype == torch.uint8
    assert layer.packed.numel() == layer.in_features * layer.out_features // 2  # still 4 bits a weight
    ref = LlamaForCausalLM.from_pretrained(ref_dir).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        assert (ours(ids).float() - want).abs().max().item() < tol * max(1.0, want.abs().max().item())


def test_int4_kernel_shape_limit_keeps_the_slow_path():
    """The CPU int4 kernel needs out_features % 16 == 0; an AWQ layer with 8 | out only stays on the
    dequantizing path, with a warning, and both paths agree where both apply."""
    from nanovl.quant.prepack import Int4PackedLinear, repack_int4

    model = torch.nn.Sequential(AWQLinear(64, 40, False, 32), AWQLinear(64, 32, False, 32))
    for layer in model:
        tensors, _ = quantize_awq(torch.randn(layer.scales.shape[1], 64), group=32)
        for k, v in tensors.items():
            setattr(layer, k, v)
    slow = AWQLinear(64, 32, False, 32)
    slow.load_state_dict(model[1].state_dict())
    with pytest.warns(UserWarning, match="1 AWQ layers .e.g. 0."):
        assert repack_int4(model, torch.float32) == 1
    assert type(model[0]) is AWQLinear and isinstance(model[1], Int4PackedLinear)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert (model[1](x) - slow(x)).abs().max() < 1e-4


def test_bad_quantized_checkpoints(tiny_llama, tmp_path):
    make_quantized(tiny_llama, tmp_path / "q", "FP8")
    (tmp_path / "q" / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "INT3"}}))
    with pytest.raises(CheckpointError, match="algorithm 'INT3' is not supported"):
        load_text_model(tmp_path / "q")
    # scales of the wrong shape; a packed weight one byte short per row
    for i, key in enumerate(["model.layers.0.mlp.up_proj.weight_scale", "model.layers.1.mlp.down_proj.weight"]):
        d = tmp_path / f"n{i}"
        make_quantized(tiny_llama, d, "NVFP4")
        s = load_file(d / "model.safetensors")
        s[key] = s[key][:, :-1].contiguous()
        save_file(s, d / "model.safetensors")
        with pytest.raises(
            CheckpointError, match=rf"{key.replace('.', chr(92) + '.')} in model\.safetensors has shape"
        ):
            load_text_model(d)


def test_unknown_scheme_errors_name_every_supported_format(tiny_llama, tmp_path):
    """Both refusals list what FORMATS reads: ModelOpt FP8 / NVFP4, AutoAWQ and compressed-tensors INT8."""
    make_quantized(tiny_llama, tmp_path / "q", "FP8")
    (tmp_path / "q" / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "INT3"}}))
    with pytest.raises(CheckpointError, match=r"'INT3' is not supported \(supported: FP8, NVFP4, AWQ, INT8\)"):
        load_text_model(tmp_path / "q")
    (tmp_path / "q" / "hf_quant_config.json").unlink()
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "GPTQ"}}))
    supported = r"\(supported: modelopt FP8/NVFP4, awq AWQ, compressed-tensors INT8\)"
    with pytest.raises(CheckpointError, match=rf"quantization method 'gptq' is not supported {supported}"):
        load_text_model(tmp_path / "q")
