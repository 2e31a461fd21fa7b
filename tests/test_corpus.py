"""`nanovl tiles` and `nanovl ask` over every image and PDF of ../shared/corpus, through the CLI entry
point, with tiny random checkpoints of both families: the answers are noise, but no run may fail."""

import json
from pathlib import Path

import pytest

from nanovl.cli import main

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
FILES = sorted(p for p in CORPUS.glob("*/*") if p.suffix.lower() in (".pdf", ".png", ".jpg", ".jpeg"))

pytestmark = pytest.mark.skipif(not FILES, reason=f"the shared corpus is not at {CORPUS}")


def test_corpus_is_complete():
    assert len(FILES) >= 20  # 15 PDFs and 9 images in the corpus MANIFEST


@pytest.mark.parametrize("family", ["v1", "nvlm"])
def test_tiles_on_every_corpus_file(family, tiny_v1, tiny_nvlm, capsys, tmp_path):
    model = {"v1": tiny_v1, "nvlm": tiny_nvlm}[family]
    for f in FILES:
        assert main(["tiles", str(f), "--model", str(model), "--json", "--out", str(tmp_path / "grid.png")]) == 0, f
        pages = json.loads(capsys.readouterr().out)
        assert pages and all(p["image_tokens"] == 256 * p["tiles"] for p in pages)
    assert list(tmp_path.glob("grid*.png"))


@pytest.mark.parametrize("family", ["v1", "nvlm"])
def test_ask_on_every_corpus_file(family, tiny_v1, tiny_nvlm, capsys):
    model = {"v1": tiny_v1, "nvlm": tiny_nvlm}[family]
    for f in FILES:
        rc = main(
            ["ask", "--model", str(model), str(f), "What is the total amount?", "--max-tokens", "3", "--dpi", "72"]
        )
        captured = capsys.readouterr()
        assert rc == 0, (f, captured.err)
        assert captured.out.endswith("\n")
