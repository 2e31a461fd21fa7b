"""Extraction confidence calibration: the isotonic map and the ECE on a known miscalibrated process,
and `nanovl extract calibrate` end to end (a tiny random model: the mechanics, not the figures)."""

import json
import shutil

import numpy as np
import pytest

from nanovl.cli import main
from nanovl.documents.calibrate import calibrate, ece, fit, same_value
from nanovl.documents.extract import Calibration


def test_ece_by_hand():
    # bin [0.9, 1.0): confidence 0.95, accuracy 0.5 -> gap 0.45 over half the values;
    # bin [0.1, 0.2): confidence 0.15, accuracy 0.0 -> gap 0.15 over the other half
    conf = [0.95, 0.95, 0.15, 0.15]
    right = [1, 0, 0, 0]
    assert ece(conf, right) == pytest.approx(0.5 * 0.45 + 0.5 * 0.15)
    assert ece([0.25, 0.25, 0.25, 0.25], [1, 0, 0, 0]) == pytest.approx(0.0)


def test_isotonic_map_calibrates_a_miscalibrated_model(tmp_path):
    """Values right with probability confidence**3 (an overconfident model): the map fitted on one half
    brings the other half's ECE from ~0.25 to <= 0.05, and it is monotone."""
    rng = np.random.default_rng(0)
    rows = []
    for d in range(400):
        for f in range(10):
            c = float(rng.uniform())
            rows.append(
                {"document": f"doc{d}", "field": f"f{f}", "confidence": c, "correct": bool(rng.uniform() < c**3)}
            )
    s = calibrate(rows, tmp_path / "cal.json", tmp_path / "cal.png")
    m = s["measured"]
    assert m["documents"] == 200 and m["values"] == 2000
    assert m["ece_before"] > 0.2 and m["ece_after"] <= 0.05, m
    cal = Calibration.load(tmp_path / "cal.json")
    grid = np.linspace(0, 1, 101)
    mapped = [cal(x) for x in grid]
    assert all(a <= b for a, b in zip(mapped, mapped[1:]))
    assert cal(0.5) == pytest.approx(0.125, abs=0.06)  # the truth: 0.5 ** 3
    assert (tmp_path / "cal.png").stat().st_size > 1000
    xs, ys = fit([0.1, 0.1, 0.9], [0, 1, 1])
    assert xs == [0.1, 0.9] and ys == [0.5, 1.0]


def test_same_value():
    assert same_value(" Acme  Ltd ", "acme ltd") and not same_value("Acme", "Acme Ltd") and not same_value(None, "x")


def test_cli_calibrate_then_extract_says_calibrated(tiny_v1, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_v1, model)
    data = tmp_path / "data"
    assert main(["synth", str(data), "--split", "eval", "--count", "2", "--kinds", "receipt", "--pdf"]) == 0
    capsys.readouterr()
    assert main(["extract", "calibrate", "--model", str(model), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "expected calibration error" in out
    saved = json.loads((model / "extract_calibration.json").read_text())
    assert saved["fit"]["documents"] == 1 and saved["measured"]["documents"] == 1
    assert (model / "extract_calibration.png").is_file()
    assert main(["extract", "--model", str(model), str(data / "pdf" / "receipt-1000000.pdf"), "--fields", "total",
                 "--max-tokens", "300"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["confidence"] == "calibrated"
    # training data is refused: calibration must be measured on held-out documents
    train = tmp_path / "train"
    assert main(["synth", str(train), "--count", "1", "--kinds", "receipt", "--pdf"]) == 0
    assert main(["extract", "calibrate", "--model", str(model), "--data", str(train)]) == 1
    assert "held-out" in capsys.readouterr().err
