"""`nanovl quantize`: write a quantized checkpoint, and report what it costs.

- FP8 in ModelOpt's layout (per-tensor `weight_scale` = max|W| / 448, `input_scale` calibrated as the
  largest |activation| seen entering the layer on calibration text / 448), with `hf_quant_config.json`.
- int8 in the compressed-tensors W8A8 layout (per-channel weights, dynamic per-token activations).
- AWQ int4 in AutoAWQ's GEMM layout, with the activation-aware scale search (or plain round-to-nearest).
The language model's Linear layers are quantized; lm_head, the vision tower and the projector stay as
they are unless asked (`--include-vision`; `--int8-embeddings`, a nanovl extension other engines do
not read: the token embedding and lm_head as int8 rows, one matrix when they are tied).
The report (printed, and written as quant_report.json beside the checkpoint) compares the new
checkpoint with the original on held-out text: mean and max absolute logit error, perplexity before
and after.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from torch import nn

from nanovl.errors import NanovlError

FP8_MAX = 448.0
EVAL_OFFSET = 900_000  # synthetic training seeds far from the calibration ones, for the held-out images
# Calibration and held-out text when the user gives none: document-like English, different halves.
DEFAULT_TEXT = [
    "Invoice number 2024-117 was issued on 3 March 2024 to Northwind Traders for 12 units of item A-44.",
    "The subtotal is 1,250.00 EUR, VAT at 20 percent adds 250.00 EUR, and the total due is 1,500.00 EUR.",
    "Quarterly revenue grew from 4.1 to 4.6 million dollars while operating costs stayed almost flat.",
    "Please sign the form and return it to the human resources office before the end of the month.",
    "The table lists each region, its number of stores, its sales in 2023 and the change from 2022.",
    "Payment is due within thirty days; late payments incur interest of one percent per month.",
    "The chart shows monthly rainfall in millimetres for three cities over a period of two years.",
    "Receipt: two coffees 7.00, one sandwich 6.50, service 1.35, total 14.85, paid by card.",
]


def synthdocs_texts(count: int) -> list[str]:
    """Document text from nanovl's synthetic generator (training seeds): transcriptions and QA turns."""
    from nanovl.synth import KINDS, make_doc

    out: list[str] = []
    seed = 0
    while len(out) < count:
        for kind in KINDS:
            doc = make_doc(kind, seed, augment_strength=0)
            out.append(doc.transcription)
            out.append(" ".join(f"{q['question'].splitlines()[0]} {q['answer']}" for q in doc.qa))
        seed += 1
    return out[:count]


def calibration_texts(source: str | None, samples: int) -> tuple[list[str], list[str]]:
    """(calibration, held-out) texts: a text file's non-empty lines, `synthdocs` (synthetic document
    text, samples + a quarter more held out), or the built-in sentences."""
    if source is None:
        lines = DEFAULT_TEXT
    elif source == "synthdocs":
        lines = synthdocs_texts(max(2, samples + samples // 3))
    else:
        path = Path(source)
        if not path.is_file():
            raise NanovlError(f"{source}: calibration file not found (a text file, one sample per line, or synthdocs)")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    if len(lines) < 2:
        raise NanovlError("calibration needs at least two lines of text (one is held out)")
    held = max(1, len(lines) // 4)
    return lines[held:][:samples], lines[:held]


def record_inputs(run, modules: dict, record, batches):
    """Call run(b) for each batch, calling record(key, x) with the input x of each module."""
    hooks = [m.register_forward_pre_hook(lambda mod, args, key=key: record(key, args[0].detach()))
             for key, m in modules.items()]  # fmt: skip
    try:
        for b in batches:
            run(b)
    finally:
        for h in hooks:
            h.remove()


@torch.inference_mode()
def input_absmax(run, modules: dict[str, nn.Module], batches) -> dict[str, float]:
    """The largest |input| each module sees while run(b) goes over the calibration batches."""
    seen: dict[str, float] = {}
    record_inputs(run, modules, lambda k, x: seen.__setitem__(k, max(seen.get(k, 0.0), float(x.abs().max()))),
                  batches)  # fmt: skip
    return seen


@torch.inference_mode()
def report(original: nn.Module, quantized: nn.Module, token_batches: list[torch.Tensor]) -> dict:
    errors, nll = [], {"original": 0.0, "quantized": 0.0}
    count = 0
    for ids in token_batches:
        a, b = original(ids).float(), quantized(ids).float()
        errors.append((a - b).abs())
        target = ids[:, 1:]
        for key, logits in (("original", a), ("quantized", b)):
            flat = logits[:, :-1].flatten(0, 1)
            nll[key] += float(torch.nn.functional.cross_entropy(flat, target.flatten(), reduction="sum"))
        count += target.numel()
    err = torch.cat([e.flatten() for e in errors])
    ppl = {k: math.exp(v / max(count, 1)) for k, v in nll.items()}
    return {
        "held_out_tokens": count,
        "logit_abs_error_mean": float(err.mean()),
        "logit_abs_error_max": float(err.max()),
        "perplexity_original": ppl["original"],
        "perplexity_quantized": ppl["quantized"],
        "perplexity_change_percent": 100 * (ppl["quantized"] / ppl["original"] - 1),
    }


def quantize_int8(model_dir: str, out_dir: str, calibration: str | None = None, samples: int = 64,
                  include_vision: bool = False, int8_embeddings: bool = False) -> dict:  # fmt: skip
    """int8 per-channel weights, dynamic per-token int8 activations, in the compressed-tensors layout."""
    return quantize_fp8(model_dir, out_dir, calibration, samples, "int8", include_vision, int8_embeddings)


def load_source(src: Path):
    """(checkpoint, root module, language model, is_vlm) of an unquantized checkpoint, in float32."""
    from nanovl.api import load_text_model, load_vlm
    from nanovl.config import load_config
    from nanovl.models.vlm import VLMS

    ckpt = load_config(src)
    if (src / "hf_quant_config.json").is_file() or "quantization_config" in ckpt.raw:
        raise NanovlError(f"{src} is already quantized")
    if ckpt.architecture in VLMS:
        root, _ = load_vlm(src, dtype="float32")
        return ckpt, root, root.language_model, True
    if ckpt.text_prefix:
        raise NanovlError(f"{src}: a language model stored under {ckpt.text_prefix!r} of an unknown VLM")
    root, _ = load_text_model(src, dtype="float32")
    return ckpt, root, root, False


def quant_targets(root: nn.Module, is_vlm: bool, include_vision: bool) -> dict[str, nn.Linear]:
    """The Linear layers to quantize: the language model's but lm_head; with include_vision also the
    vision tower's (but its patch embedding, the first layer) and the projector's."""
    out = {}
    for name, m in root.named_modules():
        if not isinstance(m, nn.Linear) or name.endswith("lm_head"):
            continue
        vision = name.startswith(("vision_model.", "mlp1."))
        if (not is_vlm or name.startswith("language_model.")) or (include_vision and vision):
            if not name.endswith("patch_generator.embedder"):
                out[name] = m
    return out


def int8_embedding_state(root: nn.Module, is_vlm: bool) -> dict[str, torch.Tensor]:
    """`--int8-embeddings` (a nanovl extension): the token embedding as int8 rows with a scale per row,
    and lm_head too when it is untied (a tied one reuses the embedding's int8 matrix at load)."""
    lm, prefix = (root.language_model, "language_model.") if is_vlm else (root, "")
    names = [n for n, m in lm.named_modules() if type(m) is nn.Embedding]
    if len(names) != 1:
        raise NanovlError(f"--int8-embeddings: expected one token embedding, found {len(names)}")
    mats = {names[0]: lm.get_submodule(names[0]).weight}
    if not lm.config.tie_word_embeddings:
        mats["lm_head"] = lm.lm_head.weight
    state = {}
    for name, w in mats.items():
        state[f"{prefix}{name}.weight"], state[f"{prefix}{name}.weight_scale"] = int8_rows(w.detach())
    return state


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a (rows, cols) matrix: codes int8 and scales fp32 (rows, 1)."""
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale.float()


def calibration_pixels(vlm, count: int, offset: int = 0) -> torch.Tensor:
    """Tiles of synthetic document pages, tiled as the checkpoint tiles them (vision calibration)."""
    from nanovl.synth import KINDS, make_doc
    from nanovl.tiling import make_tiles, plan_tiles

    spec, tiles = vlm.config.tiles, []
    for k in range(count):
        page = make_doc(KINDS[k % len(KINDS)], offset + k // len(KINDS)).pages[0]
        tiles.append(make_tiles(page, spec, plan_tiles(spec, *page.size, max_tiles=2)))
    return torch.cat(tiles)


@torch.inference_mode()
def vision_report(original, quantized, pixels: torch.Tensor) -> dict:
    a = torch.cat([original.encode_images(c) for c in pixels.split(4)]).float()
    b = torch.cat([quantized.encode_images(c) for c in pixels.split(4)]).float()
    return {"image_embedding_rel_error": float((a - b).norm() / a.norm()), "held_out_tiles": len(pixels)}


def quantize_fp8(model_dir: str, out_dir: str, calibration: str | None = None, samples: int = 64,
                 method: str = "fp8", include_vision: bool = False, int8_embeddings: bool = False) -> dict:  # fmt: skip
    from safetensors.torch import save_file

    from nanovl.api import load_text_model, load_vlm
    from nanovl.tokenizer import Tokenizer
    from nanovl.weights import checkpoint_index

    src, out = Path(model_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise NanovlError(f"{out} exists and is not empty")
    ckpt, root, lm, is_vlm = load_source(src)
    if include_vision and not is_vlm:
        raise NanovlError("--include-vision needs a vision-language checkpoint")
    tokenizer = Tokenizer(src, ckpt.text.eos_token_ids)
    calib, held = calibration_texts(calibration, samples)
    batches = lambda texts: [torch.tensor([tokenizer.encode(t)]) for t in texts]  # noqa: E731
    targets = quant_targets(root, is_vlm, include_vision)
    prefix = "language_model." if is_vlm else ""
    absmax = {}
    if method == "fp8":
        linears = {n: m for n, m in lm.named_modules() if isinstance(m, nn.Linear)}
        absmax = {prefix + k: v for k, v in input_absmax(lm, linears, batches(calib)).items()}
        if include_vision:
            vision = {k: m for k, m in targets.items() if not k.startswith("language_model.")}
            pixels = calibration_pixels(root, max(2, samples // 8))
            absmax.update(input_absmax(root.encode_images, vision, pixels.split(4)))

    state = {}
    for name, module in targets.items():
        w = module.weight.detach()
        if method == "fp8":
            scale = (w.abs().max() / FP8_MAX).clamp(min=1e-12)
            state[f"{name}.weight"] = (w / scale).to(torch.float8_e4m3fn)
            state[f"{name}.weight_scale"] = scale.reshape(())
            state[f"{name}.input_scale"] = torch.tensor(max(absmax.get(name, 0.0), 1e-12) / FP8_MAX)
        else:
            state[f"{name}.weight"], state[f"{name}.weight_scale"] = int8_rows(w)
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach()
    if int8_embeddings:
        state.update(int8_embedding_state(root, is_vlm))
    replaced = {f"{n}.weight" for n in targets}
    stored = set(checkpoint_index(src))  # the rest as the original stores it (a tied lm_head stays absent)
    dtype = getattr(torch, ckpt.text.dtype, torch.float32)
    for name, t in root.state_dict().items():
        if name not in replaced and name not in state and name in stored:
            state[name] = t.detach().to(dtype if t.is_floating_point() else t.dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    exclude = [] if int8_embeddings else [prefix + "lm_head"]
    exclude += [] if include_vision or not is_vlm else ["vision_model*", "mlp1*"]
    extension = {"nanovl_int8_embeddings": True} if int8_embeddings else {}
    if method == "fp8":
        quant = {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": exclude, **extension}
        hf_quant = {"producer": {"name": "nanovl"}, "quantization": quant}
        (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2) + "\n")
    else:
        cfg = json.loads((src / "config.json").read_text())
        scheme = {"targets": ["Linear"],
                  "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
                  "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                        "dynamic": True}}  # fmt: skip
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "int-quantized",
                                      "config_groups": {"group_0": scheme}, "ignore": exclude, **extension}  # fmt: skip
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    quantized = load_vlm(out, dtype="float32")[0] if is_vlm else load_text_model(out, dtype="float32")[0]
    qlm = quantized.language_model if is_vlm else quantized
    result = {"method": method, "calibration_samples": len(calib), "quantized_layers": len(targets),
              "include_vision": include_vision, "int8_embeddings": int8_embeddings,
              **report(lm, qlm, batches(held))}  # fmt: skip
    if is_vlm:
        result.update(vision_report(root, quantized, calibration_pixels(root, 2, offset=EVAL_OFFSET)))
    (out / "quant_report.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def check_eval(model_dir: str, data: str) -> None:
    """What `--eval` needs, checked before any work: a vision-language checkpoint and the file."""
    from nanovl.config import load_config
    from nanovl.models.vlm import VLMS

    if load_config(model_dir).architecture not in VLMS:
        raise NanovlError("--eval scores a vision-language checkpoint; this one is text-only")
    if not Path(data).is_file():
        raise NanovlError(f"{data}: evaluation file not found (eval.jsonl from `nanovl synth --split eval`)")


def score_change(original_dir: str, quantized_dir: str, data: str, max_tokens: int = 64) -> dict:
    """Score the original and the quantized vision-language checkpoint on a held-out synthdocs file
    (`nanovl synth --split eval`), greedy, with the evaluation harness; predictions go to
    quantized_dir/quant_eval/{original,quantized}/ (a rerun resumes them). Returns each metric's
    two values and their change (points, 0-100, as the eval summary), and updates quant_report.json."""
    from nanovl.eval.datasets import load
    from nanovl.eval.runner import LocalBackend, run

    check_eval(original_dir, data)
    items = load("synthdocs", data)
    summaries = {}
    for key, folder in (("original", original_dir), ("quantized", quantized_dir)):
        where = Path(quantized_dir) / "quant_eval" / key
        summaries[key] = run("synthdocs", items, LocalBackend(str(folder)), where, max_tokens=max_tokens)
    a, b = summaries["original"], summaries["quantized"]
    metrics = {k: {"original": a[k], "quantized": b[k], "change": b[k] - a[k]}
               for k, v in a.items() if isinstance(v, float) and isinstance(b.get(k), float)}  # fmt: skip
    result = {"eval_items": len(items), "eval_failed": a["failed"] + b["failed"], "eval": metrics}
    path = Path(quantized_dir) / "quant_report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**report, **result}, indent=2) + "\n")
    return result


# --- AWQ int4 --------------------------------------------------------------------------------------


def int4_codes(w: torch.Tensor, group: int):
    """Round-to-nearest asymmetric 4-bit per group of `group` input columns. w: (out, in) ->
    codes (out, in/group, group) in 0..15, scales and zero points (out, in/group, 1)."""
    out, inp = w.shape
    g = w.reshape(out, inp // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, 15)
    return torch.clamp(torch.round(g / scale) + zero, 0, 15), scale, zero


def fake_quant_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """int4_codes, dequantized back to (out, in)."""
    q, scale, zero = int4_codes(w, group)
    return ((q - zero) * scale).reshape(w.shape)


def awq_groups(layer) -> list[tuple[str, list[nn.Linear], object]]:
    """The Llama-style layer's Linear groups that share an input, and how to fold 1/s before them."""
    attn, mlp = layer.self_attn, layer.mlp

    def into_norm(norm):
        return lambda s: norm.weight.data.div_(s)

    def into_rows(linear):
        def fold(s):
            linear.weight.data.div_(s[:, None])
            if linear.bias is not None:
                linear.bias.data.div_(s)

        return fold

    groups = [("qkv", [attn.q_proj, attn.k_proj, attn.v_proj], into_norm(layer.input_layernorm))]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:  # without GQA, o_proj's input is v_proj's rows
        groups.append(("o", [attn.o_proj], into_rows(attn.v_proj)))
    groups.append(("gate_up", [mlp.gate_proj, mlp.up_proj], into_norm(layer.post_attention_layernorm)))
    groups.append(("down", [mlp.down_proj], into_rows(mlp.up_proj)))
    return groups


@torch.inference_mode()
def awq_scales(model, token_batches, group: int, grid: int = 20) -> dict:
    """Activation-aware scales: per group of Linear layers sharing an input, s = mean|x|^alpha
    (normalised), alpha in [0, 1) on a grid, chosen to minimise the group's output error after
    4-bit fake quantization of W * s (the AWQ search). Returns {(layer index, group name): (s, fold)}."""
    inputs: dict[int, torch.Tensor] = {}

    def record(key, x):
        x = x.reshape(-1, x.shape[-1])
        inputs[key] = torch.cat([inputs[key], x]) if key in inputs else x

    firsts = {id(linears[0]): linears[0] for layer in model.model.layers for _, linears, _ in awq_groups(layer)}
    record_inputs(model, firsts, record, token_batches)
    chosen = {}
    for i, layer in enumerate(model.model.layers):
        for name, linears, fold in awq_groups(layer):
            x = inputs[id(linears[0])]
            mean = x.abs().mean(0).clamp(min=1e-5)
            want = [x @ lin.weight.t() for lin in linears]
            best, best_s = float("inf"), torch.ones_like(mean)
            for k in range(grid):
                s = mean.pow(k / grid)
                s = s / (s.max() * s.min()).sqrt()
                err = sum(float((x @ (fake_quant_int4(lin.weight * s, group) / s).t() - y).pow(2).sum())
                          for lin, y in zip(linears, want))  # fmt: skip
                if err < best:
                    best, best_s = err, s
            chosen[(i, name)] = (best_s, fold, linears)
    return chosen


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """(rows, cols) ints 0..15 -> (rows, cols/8) int32 in AutoAWQ's order (column AWQ_ORDER[k] at nibble k)."""
    from nanovl.quant import AWQ_ORDER

    rows, cols = values.shape
    v = values.reshape(rows, cols // 8, 8).to(torch.int64)
    word = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for k, col in enumerate(AWQ_ORDER):
        word |= v[..., col] << (4 * k)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def awq_tensors(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors of a (out, in) weight: qweight (in, out/8), qzeros and scales (in/g, out)."""
    q, scale, zero = int4_codes(w, group)
    codes = q.reshape(w.shape).t()  # (in, out)
    zeros, scales = zero[..., 0].t(), scale[..., 0].t()  # (in/group, out)
    return {"qweight": pack_awq(codes.long()), "qzeros": pack_awq(zeros.long()), "scales": scales.half()}


def quantize_awq(model_dir: str, out_dir: str, calibration: str | None = None, samples: int = 64, group: int = 128,
                 search: bool = True, grid: int = 20, include_vision: bool = False,
                 int8_embeddings: bool = False) -> dict:  # fmt: skip
    """AWQ int4 in AutoAWQ's GEMM layout; search=False gives plain round-to-nearest (the baseline).
    Of a vision-language checkpoint, the language model is quantized (the 8B's edge recipe)."""
    from safetensors.torch import save_file

    from nanovl.api import load_text_model, load_vlm
    from nanovl.tokenizer import Tokenizer
    from nanovl.weights import checkpoint_index

    src, out = Path(model_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise NanovlError(f"{out} exists and is not empty")
    if include_vision:
        raise NanovlError("AWQ here quantizes the language model; quantize the vision tower with fp8 or int8")
    ckpt, original_root, original, is_vlm = load_source(src)
    if not hasattr(ckpt.text, "rope"):
        raise NanovlError("AWQ here covers Llama / Qwen2 language models (not Nemotron-H)")
    _, root, model, _ = load_source(src)
    linears = quant_targets(root, is_vlm, False)
    for name, m in linears.items():
        if m.out_features % 8:
            raise NanovlError(f"{name}: out_features {m.out_features} does not divide by 8, which AWQ's packing needs")
        if m.in_features % group:
            fits = [g for g in (128, 64, 32) if all(x.in_features % g == 0 for x in linears.values())]
            hint = f"--group-size {fits[0]}" if fits else "a --group-size that divides every layer's in_features"
            raise NanovlError(f"{name}: in_features {m.in_features} does not divide by the group size {group}; "
                              f"pass {hint}")  # fmt: skip
    tokenizer = Tokenizer(src, ckpt.text.eos_token_ids)
    calib, held = calibration_texts(calibration, samples)
    batches = lambda texts: [torch.tensor([tokenizer.encode(t)]) for t in texts]  # noqa: E731
    if search:
        for s, fold, group_linears in awq_scales(model, batches(calib), group, grid).values():
            for lin in group_linears:
                lin.weight.data.mul_(s)
            fold(s)
    state = int8_embedding_state(root, is_vlm) if int8_embeddings else {}
    stored = set(checkpoint_index(src))  # the rest as the original stores it
    for name, t in root.state_dict().items():
        base = name.rsplit(".", 1)[0]
        if name in state:
            continue
        if base in linears and name.endswith(".weight"):
            state.update({f"{base}.{k}": v for k, v in awq_tensors(t, group).items()})
        elif name in stored:
            state[name] = t.detach().to(torch.float16 if t.is_floating_point() else t.dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    keep = ["lm_head", "vision_model", "mlp1"] if is_vlm else ["lm_head"]  # AutoAWQ: name substrings
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": keep}  # fmt: skip
    if int8_embeddings:
        cfg["quantization_config"]["nanovl_int8_embeddings"] = True
    if is_vlm:
        cfg["llm_config"] = {**cfg.get("llm_config", {}), "torch_dtype": "float16"}
    cfg["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    quantized = load_vlm(out, dtype="float32")[0] if is_vlm else load_text_model(out, dtype="float32")[0]
    qlm = quantized.language_model if is_vlm else quantized
    result = {"method": "awq" if search else "rtn", "group_size": group, "calibration_samples": len(calib),
              "quantized_layers": len(linears), "int8_embeddings": int8_embeddings,
              **report(original, qlm, batches(held))}  # fmt: skip
    if is_vlm:
        result.update(vision_report(original_root, quantized, calibration_pixels(original_root, 2, EVAL_OFFSET)))
    (out / "quant_report.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
