"""One path for a question about a document: the Python API, the CLI and the server each go through
the same processor (`Processor.prepare_chat`) and the same per-token step (`TokenStep`), and give
the same greedy answer for the same page."""

import base64
import io

import pytest
from PIL import Image

import nanovl
from nanovl.cli import main
from nanovl.engine.step import TokenStep
from nanovl.processor import Processor

QUESTION = "What is the total?"
TOKENS = 6


@pytest.fixture
def calls(monkeypatch):
    seen = {"prepare_chat": 0, "step": 0}
    prepare_chat, step = Processor.prepare_chat, TokenStep.__call__

    def counted_prepare(self, *a, **kw):
        seen["prepare_chat"] += 1
        return prepare_chat(self, *a, **kw)

    def counted_step(self, *a, **kw):
        seen["step"] += 1
        return step(self, *a, **kw)

    monkeypatch.setattr(Processor, "prepare_chat", counted_prepare)
    monkeypatch.setattr(TokenStep, "__call__", counted_step)
    return seen


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "page.png"
    Image.effect_mandelbrot((640, 480), (-2, -1, 1, 1), 40).convert("RGB").save(path)
    return path


def test_api_cli_and_server_take_one_path(tiny_v1, page, calls, capsys):
    from fastapi.testclient import TestClient

    from nanovl.serve.app import create_app

    model = nanovl.load(tiny_v1)
    answer = model.ask(page, QUESTION, max_new_tokens=TOKENS, temperature=0.0).text
    api_calls = dict(calls)
    assert api_calls == {"prepare_chat": 1, "step": TOKENS}

    assert main(["ask", "--model", str(tiny_v1), str(page), QUESTION, "--max-tokens", str(TOKENS)]) == 0
    assert capsys.readouterr().out.strip() == answer.strip()
    assert calls == {"prepare_chat": 2, "step": 2 * TOKENS}

    url = "data:image/png;base64," + base64.b64encode(page.read_bytes()).decode()
    body = {"model": "tiny", "max_tokens": TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": QUESTION}]}]}  # fmt: skip
    with TestClient(create_app(model, "tiny")) as client:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == answer
    assert calls == {"prepare_chat": 3, "step": 3 * TOKENS}


def test_the_page_reaches_all_three_as_the_same_pixels(tiny_v1, page):
    """The server decodes the data URL, the API and CLI the file: the processor sees one image."""
    from nanovl.processor import scan_source

    data = "data:image/png;base64," + base64.b64encode(page.read_bytes()).decode()
    from_file, from_url = scan_source(page)[0].load(), scan_source(data)[0].load()
    assert from_file.size == from_url.size and from_file.tobytes() == from_url.tobytes()
    with Image.open(io.BytesIO(page.read_bytes())) as im:
        assert from_file.tobytes() == im.convert("RGB").tobytes()
