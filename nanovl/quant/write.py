"""Writing a quantized checkpoint folder: the steps every `nanovl quantize` writer shares.

- The source is an unquantized checkpoint, loaded in float32 (a quantized one is refused); of a
  vision-language checkpoint the language model's Linear layers are the targets, lm_head stays, and
  the vision tower (but its patch embedding, the first layer) and the projector are added on request.
- The new folder holds every file of the source but its weights, one `model.safetensors` with the
  quantized tensors and everything else as the source stores it (a tied lm_head stays absent), and the
  format's config file(s). `--int8-embeddings` adds the extension's tensors whatever the format.
- The folder is then loaded back the way inference loads it and compared with the source
  (calibrate.py's report), so the report describes the files written, not the tensors in memory.
- The formats' own pieces (what a layer's tensors and the config file are) live in fp8.py, int8.py
  and awq.py; this module holds the flows: FP8 and INT8 quantize layer by layer (`quantize_layers`),
  AWQ rescales a second copy of the model before rounding it. `WRITERS` maps `nanovl quantize
  --method` to its flow. Loading lives above the formats: checkpoint.py imports the formats' Linear
  modules and readers, and this module imports checkpoint.py, never the other way round.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from nanovl.checkpoint import load_config, load_text_model, load_vlm
from nanovl.errors import NanovlError
from nanovl.models import architecture, is_vlm
from nanovl.quant import awq, fp8, int8
from nanovl.quant.calibrate import EVAL_OFFSET, calibration_pixels, calibration_texts, report, vision_report
from nanovl.quant.int8_embeddings import int8_embedding_state
from nanovl.quant.source import Source
from nanovl.tokenizer import Tokenizer


def check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise NanovlError(f"{out} exists and is not empty")


def load_source(src: Path) -> Source:
    ckpt = load_config(src)
    if (src / "hf_quant_config.json").is_file() or "quantization_config" in ckpt.raw:
        raise NanovlError(f"{src} is already quantized")
    if architecture(ckpt.architecture).vlm:
        root, _ = load_vlm(src, dtype="float32")
        lm, is_vlm = root.language_model, True
    elif ckpt.text_prefix:
        raise NanovlError(f"{src}: a language model stored under {ckpt.text_prefix!r} of an unknown VLM")
    else:
        root, _ = load_text_model(src, dtype="float32")
        lm, is_vlm = root, False
    return Source(src, ckpt, root, lm, is_vlm, Tokenizer(src, ckpt.text.eos_token_ids))


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


def unchanged_tensors(src: Source, skip: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors but those in skip, as the source stores them (floats in dtype); a tensor the
    source does not store (a tied lm_head) stays absent."""
    from nanovl.weights import checkpoint_index

    stored = set(checkpoint_index(src.path))
    return {name: t.detach().to(dtype if t.is_floating_point() else t.dtype).contiguous()
            for name, t in src.root.state_dict().items() if name in stored and name not in skip}  # fmt: skip


def write_checkpoint(src: Source, out: Path, state: dict[str, torch.Tensor], configs: dict[str, dict]) -> None:
    """The source's files but its weights, `model.safetensors` from state, and configs ({file name: JSON},
    config.json among them when the format rewrites it)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in src.path.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    for name, content in configs.items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})


def finish(original: Source, out: Path, result: dict, held: list[str]) -> dict:
    """Load the written checkpoint back, add the report against the original to result, write
    quant_report.json and return it."""
    quantized = load_vlm(out, dtype="float32")[0] if original.is_vlm else load_text_model(out, dtype="float32")[0]
    qlm = quantized.language_model if original.is_vlm else quantized
    result = {**result, **report(original.lm, qlm, original.tokens(held))}
    if original.is_vlm:
        pixels = calibration_pixels(original.root, 2, offset=EVAL_OFFSET)
        result.update(vision_report(original.root, quantized, pixels))
    (out / "quant_report.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def quantize_layers(method: str, layer_state: Callable[..., dict], config_files: Callable[..., dict],
                    model_dir: str, out_dir: str, calibration: str | None, samples: int, include_vision: bool,
                    int8_embeddings: bool) -> dict:  # fmt: skip
    """A writer that quantizes each target layer on its own (FP8, INT8). The format supplies
    layer_state(source, targets, calibration texts, samples, include_vision) -> the targets' tensors,
    and config_files(source, include_vision, int8_embeddings) -> {file name: JSON}."""
    src, out = Path(model_dir), Path(out_dir)
    check_out(out)
    source = load_source(src)
    if include_vision and not source.is_vlm:
        raise NanovlError("--include-vision needs a vision-language checkpoint")
    calib, held = calibration_texts(calibration, samples)
    targets = quant_targets(source.root, source.is_vlm, include_vision)
    state = layer_state(source, targets, calib, samples, include_vision)
    if int8_embeddings:
        state.update(int8_embedding_state(source.root, source.is_vlm))
    dtype = getattr(torch, source.ckpt.text.dtype, torch.float32)
    state.update(unchanged_tensors(source, {f"{n}.weight" for n in targets} | set(state), dtype))
    write_checkpoint(source, out, state, config_files(source, include_vision, int8_embeddings))
    result = {"method": method, "calibration_samples": len(calib), "quantized_layers": len(targets),
              "include_vision": include_vision, "int8_embeddings": int8_embeddings}  # fmt: skip
    return finish(source, out, result, held)


def quantize_fp8(model_dir: str, out_dir: str, calibration: str | None = None, samples: int = 64,
                 include_vision: bool = False, int8_embeddings: bool = False) -> dict:  # fmt: skip
    """FP8 in ModelOpt's layout with `hf_quant_config.json`; returns the report (quant_report.json)."""
    return quantize_layers("fp8", fp8.layer_state, fp8.config_files, model_dir, out_dir, calibration, samples,
                           include_vision, int8_embeddings)  # fmt: skip


def quantize_int8(model_dir: str, out_dir: str, calibration: str | None = None, samples: int = 64,
                  include_vision: bool = False, int8_embeddings: bool = False) -> dict:  # fmt: skip
    """int8 per-channel weights, dynamic per-token int8 activations, in the compressed-tensors layout;
    returns the report (quant_report.json)."""
    return quantize_layers("int8", int8.layer_state, int8.config_files, model_dir, out_dir, calibration, samples,
                           include_vision, int8_embeddings)  # fmt: skip


def quantize_awq(model_dir: str, out_dir: str, calibration: str | None = None, samples: int = 64, group: int = 128,
                 search: bool = True, grid: int = 20, include_vision: bool = False,
                 int8_embeddings: bool = False) -> dict:  # fmt: skip
    """AWQ int4 in AutoAWQ's GEMM layout; search=False gives plain round-to-nearest (the baseline).
    Of a vision-language checkpoint, the language model is quantized (the 8B's edge recipe). Returns
    the report (quant_report.json)."""
    src, out = Path(model_dir), Path(out_dir)
    check_out(out)
    if include_vision:
        raise NanovlError("AWQ here quantizes the language model; quantize the vision tower with fp8 or int8")
    original = load_source(src)
    source = load_source(src)  # a second copy, rescaled in place by the search
    linears = quant_targets(source.root, source.is_vlm, False)
    awq.check_targets(source.lm, linears, group)
    calib, held = calibration_texts(calibration, samples)
    state = int8_embedding_state(source.root, source.is_vlm) if int8_embeddings else {}
    state.update(awq.layer_state(source.lm, linears, source.tokens(calib), group, search, grid))
    state.update(unchanged_tensors(source, {f"{n}.weight" for n in linears} | set(state), torch.float16))
    cfg = awq.config_file(json.loads((src / "config.json").read_text()), group, source.is_vlm, int8_embeddings)
    write_checkpoint(source, out, state, {"config.json": cfg})
    result = {"method": "awq" if search else "rtn", "group_size": group, "calibration_samples": len(calib),
              "quantized_layers": len(linears), "int8_embeddings": int8_embeddings}  # fmt: skip
    return finish(original, out, result, held)


WRITERS = {"fp8": quantize_fp8, "awq": quantize_awq, "int8": quantize_int8}  # FORMATS' `method` names


def check_eval(model_dir: str, data: str) -> None:
    """What `--eval` needs, checked before any work: a vision-language checkpoint and the file."""
    if not is_vlm(load_config(model_dir).architecture):
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
