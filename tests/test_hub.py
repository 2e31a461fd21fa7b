"""--model ORG/NAME: a Hugging Face hub id resolved through the hub cache (offline here: against a
cache folder laid out the way huggingface_hub writes it)."""

import os
import subprocess
import sys

import pytest

from nanovl.errors import CheckpointError
from nanovl.hub import resolve_model
from nanovl.tiny import write_checkpoint

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """HF_HUB_CACHE with org/tiny-llama: models--org--tiny-llama/{refs/main, snapshots/<hash>/...}."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--org--tiny-llama"
    write_checkpoint("llama", repo / "snapshots" / REVISION, seed=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return cache


@pytest.fixture
def offline_cache(hub_cache, monkeypatch):
    """The cache and offline mode for this process (huggingface_hub reads its settings at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def cli(cache, *args):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "nanovl.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )
    return p.returncode, p.stdout, p.stderr


def test_generate_with_a_hub_id_reads_the_cache(hub_cache, tmp_path):
    import nanovl

    rc, out, err = cli(
        hub_cache, "generate", "--model", "org/tiny-llama", "--prompt", "Invoice total", "--max-tokens", "6"
    )
    assert rc == 0, err
    want = nanovl.load(hub_cache / "models--org--tiny-llama" / "snapshots" / REVISION).generate(
        "Invoice total", max_new_tokens=6
    )
    assert out == want.text + "\n"


def test_unknown_hub_id_is_a_one_line_error_saying_how_to_download(hub_cache):
    rc, _, err = cli(hub_cache, "generate", "--model", "org/missing", "--prompt", "hi")
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, err
    assert "org/missing" in lines[0] and "no such local folder" in lines[0] and str(hub_cache) in lines[0]
    assert "hf download org/missing --local-dir DIR" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_resolve_model(offline_cache, tmp_path, monkeypatch):
    snapshot = offline_cache / "models--org--tiny-llama" / "snapshots" / REVISION
    assert resolve_model("org/tiny-llama") == snapshot
    # an existing folder wins over the hub, even when it is spelled like an id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny-llama").mkdir(parents=True)
    assert resolve_model("org/tiny-llama").resolve() == tmp_path / "org" / "tiny-llama"
    with pytest.raises(CheckpointError, match="model folder /no/such/dir does not exist"):
        resolve_model("/no/such/dir")  # not an id: never looked up on the hub
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_model("weights.bin")


def test_library_and_config_only_commands_take_a_hub_id(offline_cache, tmp_path, capsys):
    from PIL import Image

    import nanovl
    from nanovl.cli import main

    assert nanovl.load("org/tiny-llama").generate("x", max_new_tokens=2).text is not None
    path = tmp_path / "page.png"
    Image.new("RGB", (300, 200), "white").save(path)
    (offline_cache / "models--org--tiny-vl").mkdir()
    write_checkpoint("nemotron-nano-vl-v1", offline_cache / "models--org--tiny-vl" / "snapshots" / REVISION)
    (offline_cache / "models--org--tiny-vl" / "refs").mkdir()
    (offline_cache / "models--org--tiny-vl" / "refs" / "main").write_text(REVISION)
    assert main(["tiles", str(path), "--model", "org/tiny-vl", "--json"]) == 0
    assert '"tiles"' in capsys.readouterr().out
    assert main(["quantize", "--model", "org/tiny-llama", "--method", "int8", "--out", str(tmp_path / "q"),
                 "--samples", "2"]) == 0  # fmt: skip
    assert (tmp_path / "q" / "quant_report.json").is_file()
