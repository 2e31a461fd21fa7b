"""`nanovl export onnx` and `--vision-backend onnx`: onnxruntime's embeddings against PyTorch's for the
RADIO (V1 and V2 layouts) and InternViT families at 1, 3 and 13 tiles, the same greedy answers, the
int8 graph's error, and clear errors for what cannot work."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import nanovl  # noqa: E402
from nanovl.cli import main  # noqa: E402
from nanovl.errors import NanovlError  # noqa: E402
from nanovl.onnx_export import OnnxVision, export  # noqa: E402

IMAGE = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "sroie" / "sroie_000.jpg"


@pytest.mark.parametrize("family", ["v1", "v2", "nvlm"])
def test_onnx_embeddings_equal_pytorch(family, tiny_v1, tiny_v2, tiny_nvlm, tmp_path):
    ckpt = {"v1": tiny_v1, "v2": tiny_v2, "nvlm": tiny_nvlm}[family]
    meta = export(ckpt, tmp_path / "onnx")
    m = nanovl.load(ckpt, dtype="float32")
    spec = m.processor.tiles
    onnx = OnnxVision(tmp_path / "onnx", ckpt, spec, m.config.hidden_size)
    for tiles in (1, 3, 13):
        x = torch.randn(tiles, 3, spec.tile_size, spec.tile_size, generator=torch.Generator().manual_seed(tiles))
        with torch.no_grad():
            ref = m.vlm.encode_images(x)
        got = onnx(x)
        assert got.shape == ref.shape == (tiles, spec.tokens_per_tile, m.config.hidden_size)
        assert (got - ref).abs().max().item() <= 1e-4, (family, tiles)
    assert meta["tiles"]["tile_size"] == spec.tile_size and meta["opset"] == 18


def test_greedy_answers_through_onnx_equal_pytorch(tiny_v1, tmp_path, capsys):
    if not IMAGE.is_file():
        pytest.skip("the shared corpus is not here")
    ckpt = tmp_path / "ckpt"
    import shutil

    shutil.copytree(tiny_v1, ckpt)
    assert main(["export", "onnx", "--model", str(ckpt), "--out", str(ckpt / "onnx"), "--int8"]) == 0
    out = capsys.readouterr().out
    assert "vision.onnx" in out and "vision.int8.onnx" in out
    meta = json.loads((ckpt / "onnx" / "vision.json").read_text())
    assert 0 < meta["int8"]["max_abs"] and meta["int8"]["relative_rms"] < 0.2  # measured, not zero
    answers = {}
    for backend in ("torch", "onnx"):
        args = ["ask", "--model", str(ckpt), str(IMAGE), "What is the total?", "--max-tokens", "12"]
        assert main([*args, "--vision-backend", backend]) == 0
        answers[backend] = capsys.readouterr().out
    assert answers["onnx"] == answers["torch"] and answers["torch"].strip()
    # the Python API, and several pages in one prompt
    m = nanovl.load(ckpt, dtype="float32")
    ref = m.ask([IMAGE, IMAGE], "Compare.", max_new_tokens=10).text
    assert m.use_onnx_vision().ask([IMAGE, IMAGE], "Compare.", max_new_tokens=10).text == ref


def test_onnx_errors(tiny_v1, tiny_v2, tiny_llama, tmp_path, monkeypatch, capsys):
    assert main(["export", "onnx", "--model", str(tiny_llama), "--out", str(tmp_path / "x")]) == 1
    assert "text-only" in capsys.readouterr().err
    m = nanovl.load(tiny_v2, dtype="float32")
    with pytest.raises(NanovlError, match="no exported vision graph"):
        m.use_onnx_vision(tmp_path / "nothing")
    export(tiny_v1, tmp_path / "v1")
    with pytest.raises(NanovlError, match="another checkpoint"):  # a graph from another checkpoint
        m.use_onnx_vision(tmp_path / "v1")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(NanovlError, match="pip install onnxruntime"):
        nanovl.load(tiny_v1).use_onnx_vision(tmp_path / "v1")
