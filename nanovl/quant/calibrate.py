"""What every writer shares: calibration data, and the report of what quantizing cost.

- Calibration text: a text file's non-empty lines, `synthdocs` (nanovl's synthetic document text), or
  built-in document-like sentences; a quarter of it is held out for the report, never calibrated on.
- Calibration images (vision layers, `--include-vision`): tiles of synthetic document pages, tiled as
  the checkpoint tiles them; the report's held-out pages come from seeds far from those (EVAL_OFFSET).
- The report (printed by `nanovl quantize`, written as quant_report.json beside the checkpoint)
  compares the new checkpoint with the original on the held-out text: mean and max absolute logit
  error, perplexity before and after; for a VLM the relative error of the image embeddings of held-out
  pages; with `--eval`, both checkpoints' scores on a held-out synthdocs set and the change.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from nanovl.errors import NanovlError

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


def calibration_pixels(vlm, count: int, offset: int = 0) -> torch.Tensor:
    """Tiles of synthetic document pages, tiled as the checkpoint tiles them (vision calibration)."""
    from nanovl.synth import KINDS, make_doc
    from nanovl.tiling import make_tiles, plan_tiles

    spec, tiles = vlm.config.tiles, []
    for k in range(count):
        page = make_doc(KINDS[k % len(KINDS)], offset + k // len(KINDS)).pages[0]
        tiles.append(make_tiles(page, spec, plan_tiles(spec, *page.size, max_tiles=2)))
    return torch.cat(tiles)


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
    """Logit error and perplexity of both language models on held-out (1, length) token batches."""
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


@torch.inference_mode()
def vision_report(original, quantized, pixels: torch.Tensor) -> dict:
    """Relative error of the quantized VLM's image embeddings on held-out tiles (tiles, 3, S, S)."""
    a = torch.cat([original.encode_images(c) for c in pixels.split(4)]).float()
    b = torch.cat([quantized.encode_images(c) for c in pixels.split(4)]).float()
    return {"image_embedding_rel_error": float((a - b).norm() / a.norm()), "held_out_tiles": len(pixels)}
