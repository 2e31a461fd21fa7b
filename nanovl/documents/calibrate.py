"""Calibrating extraction confidence (`nanovl extract calibrate`).

The raw confidence of a value (the joint probability of its tokens) ranks values but is not the
probability of being right. Calibration measures it on held-out synthetic documents, whose fields
are known: every field of every document is extracted, and a value counts as right when it equals
the truth after case and whitespace are normalised. The documents are split in two by position:
a monotone map (isotonic regression, scipy) is fitted on the first half, and the expected
calibration error (ECE: 10 equal-width bins, the gap between mean confidence and accuracy weighted by
the bin's share) is measured before and after on the second half, so the figure is not the fit's
own. The map is stored as points (`x`, `y`), read back by `Calibration` and applied by linear
interpolation; a reliability diagram (PNG) shows both halves' bins.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nanovl.errors import NanovlError

BINS = 10


def same_value(predicted, gold) -> bool:
    def norm(v) -> str:
        return " ".join(str(v).casefold().split())

    return predicted is not None and norm(predicted) == norm(gold)


def ece(confidence, correct, bins: int = BINS) -> float:
    """Expected calibration error over equal-width bins of [0, 1]."""
    c, y = np.asarray(confidence, float), np.asarray(correct, float)
    if len(c) == 0:
        raise NanovlError("no values to measure the calibration error on")
    which = np.minimum((c * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(c[inside].mean() - y[inside].mean())
    return float(total)


def fit(confidence, correct) -> tuple[list[float], list[float]]:
    """Isotonic regression of correctness on confidence -> the map's points (increasing x and y)."""
    try:
        from scipy.optimize import isotonic_regression
    except ImportError:
        raise NanovlError("calibration needs scipy: pip install scipy (or nanovl's 'eval' extra)") from None
    c, y = np.asarray(confidence, float), np.asarray(correct, float)
    if len(c) < 2:
        raise NanovlError(f"calibration needs at least 2 values, got {len(c)}")
    xs, where, counts = np.unique(c, return_inverse=True, return_counts=True)  # tied confidences pooled
    means = np.bincount(where, weights=y) / counts
    fitted = isotonic_regression(means, weights=counts.astype(float)).x
    return [float(x) for x in xs], [float(v) for v in fitted]


def reliability_diagram(path: Path, halves: dict[str, tuple], bins: int = BINS):
    """Accuracy against mean confidence per bin, for each (label: (confidence, correct))."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NanovlError("the reliability diagram needs matplotlib (nanovl's 'eval' extra)") from None
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="calibrated")
    for label, (conf, correct) in halves.items():
        c, y = np.asarray(conf, float), np.asarray(correct, float)
        which = np.minimum((c * bins).astype(int), bins - 1)
        xs = [c[which == b].mean() for b in range(bins) if (which == b).any()]
        ys = [y[which == b].mean() for b in range(bins) if (which == b).any()]
        ax.plot(xs, ys, marker="o", label=f"{label} (ECE {ece(c, y, bins):.3f})")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="extraction confidence")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def measure(backend, data: Path, limit: int | None = None, progress=None) -> list[dict]:
    """Extract every field of the held-out synthetic PDFs listed in DATA/pdf.jsonl -> one row per field:
    {"document", "field", "confidence" (raw), "correct"}. A document that fails counts its fields wrong
    at confidence 0 (what a user of the output would see: no value)."""
    from nanovl.documents.extract import extract, fields_schema

    listing = data / "pdf.jsonl"
    if not listing.is_file():
        raise NanovlError(f"{listing}: not found; write it with `nanovl synth {data} --split eval --pdf`")
    records = [json.loads(line) for line in listing.read_text().splitlines() if line.strip()]
    if any(r.get("split") != "eval" for r in records):
        raise NanovlError(f"{listing}: calibrate on held-out documents only (`nanovl synth --split eval`)")
    rows = []
    for r in records[:limit]:
        fields = {k: v for k, v in r["fields"].items() if v not in (None, "")}
        if not fields:
            continue
        try:
            out = extract(backend, data / r["file"], fields_schema(list(fields)), calibration=False)  # raw
            got = out["fields"]
        except NanovlError:
            got = {}
        for name, gold in fields.items():
            leaf = got.get(name)
            rows.append({"document": r["file"], "field": name, "confidence": leaf["confidence"] if leaf else 0.0,
                         "correct": bool(leaf) and same_value(leaf["value"], gold)})  # fmt: skip
        if progress is not None:
            progress(1)
    return rows


def calibrate(rows: list[dict], out: Path, plot: Path | None = None, source: str = "") -> dict:
    """Fit on the first half of the documents, measure on the second; write the map (and the diagram)."""
    docs = list(dict.fromkeys(r["document"] for r in rows))
    if len(docs) < 2:
        raise NanovlError("calibration needs at least 2 documents (one half to fit, one to measure)")
    first = set(docs[: len(docs) // 2])
    fit_rows = [r for r in rows if r["document"] in first]
    held = [r for r in rows if r["document"] not in first]
    xs, ys = fit([r["confidence"] for r in fit_rows], [r["correct"] for r in fit_rows])
    raw = [r["confidence"] for r in held]
    truth = [r["correct"] for r in held]
    mapped = list(np.interp(raw, xs, ys))
    summary = {
        "x": xs, "y": ys, "method": "isotonic regression of correctness on the joint token probability",
        "fit": {"documents": len(first), "values": len(fit_rows)},
        "measured": {"documents": len(docs) - len(first), "values": len(held), "accuracy": float(np.mean(truth)),
                     "ece_before": ece(raw, truth), "ece_after": ece(mapped, truth)},
        "data": source,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    if plot is not None:
        reliability_diagram(plot, {"raw": (raw, truth), "calibrated": (mapped, truth)})
    return summary
