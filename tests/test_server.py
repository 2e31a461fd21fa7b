"""The OpenAI-compatible server, driven by the official `openai` client on 127.0.0.1 only."""

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI
from PIL import Image

import nanovl
from nanovl.serve.app import create_app

KEY = "test-key"


class LiveServer:
    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def vl(tiny_v1):
    return nanovl.load(tiny_v1, dtype="float32")


@pytest.fixture(scope="module")
def server(vl, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    Image.new("RGB", (300, 200), "white").save(media / "page.png")
    app = create_app(vl, "tiny-vl", api_key=KEY, max_concurrency=4, max_queue=32, allowed_local_media_path=str(media))
    s = LiveServer(app)
    s.media = media
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def data_url(im: Image.Image, fmt="PNG") -> str:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def pdf_data_url(pages=2) -> str:
    from test_media import make_pdf

    path = make_pdf(__import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "d.pdf", pages)
    return "data:application/pdf;base64," + base64.b64encode(path.read_bytes()).decode()


def test_models_and_text_chat(client, vl):
    assert [m.id for m in client.models.list().data] == ["tiny-vl"]
    r = client.chat.completions.create(model="tiny-vl", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    want = vl.chat([{"role": "user", "content": "Hi"}], max_new_tokens=8)
    assert r.choices[0].message.content == want.text
    assert r.usage.completion_tokens == len(want.token_ids) and r.usage.prompt_tokens == want.prompt_tokens


def test_image_chat_matches_the_library(client, vl):
    im = Image.new("RGB", (640, 480), (250, 250, 240))
    msg = [{"role": "user", "content": [{"type": "text", "text": "What is the total?"},
                                        {"type": "image_url", "image_url": {"url": data_url(im)}}]}]  # fmt: skip
    r = client.chat.completions.create(model="tiny-vl", messages=msg, max_tokens=6)
    want = vl.ask(im, "What is the total?", max_new_tokens=6)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 256
    # with the image first, as the library places it ("<image>\n" + question), the answer is the same
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(im)}},
                                        {"type": "text", "text": "\nWhat is the total?"}]}]  # fmt: skip
    r = client.chat.completions.create(model="tiny-vl", messages=msg, max_tokens=6)
    assert r.choices[0].message.content == want.text


def test_pdf_pages_and_local_paths(client, server):
    msg = [{"role": "user", "content": [{"type": "file", "file": {"file_data": pdf_data_url(3), "pages": "2-3"}},
                                        {"type": "text", "text": "Summarise."}]}]  # fmt: skip
    r = client.chat.completions.create(model="tiny-vl", messages=msg, max_tokens=4)
    assert r.usage.prompt_tokens > 2 * 256
    local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(server.media / "page.png")}}]}]
    assert client.chat.completions.create(model="tiny-vl", messages=local, max_tokens=2).choices


def test_streaming_and_logprobs(client, vl):
    messages = [{"role": "user", "content": "Tell me about invoices."}]
    chunks = list(client.chat.completions.create(model="tiny-vl", messages=messages, max_tokens=12, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == vl.chat(messages, max_new_tokens=12).text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    r = client.chat.completions.create(model="tiny-vl", messages=messages, max_tokens=5, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) >= 1 and len(lp[0].top_logprobs) == 3 and lp[0].logprob <= 0
    assert lp[0].top_logprobs[0].logprob == pytest.approx(lp[0].logprob)  # greedy takes the top token


def test_sixteen_concurrent_greedy_requests_equal_alone(client):
    prompts = [f"Document number {i}: the total is" for i in range(16)]

    def ask(p):
        r = client.chat.completions.create(model="tiny-vl", messages=[{"role": "user", "content": p}], max_tokens=10)
        return r.choices[0].message.content

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_seeded_sampling_and_n(client):
    kw = dict(model="tiny-vl", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=1.0, seed=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert len(client.chat.completions.create(**kw, n=3).choices) == 3


def post(server, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(server.url + "/v1/chat/completions", content=raw, headers=headers, timeout=60)
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def image_msg(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


def test_bad_requests_get_openai_errors(server, tmp_path):
    from test_media import png_header_only

    ok = {"model": "tiny-vl", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    bomb = "data:image/png;base64," + base64.b64encode(png_header_only(40000, 40000)).decode()
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode()
    cases = [
        (dict(ok), None, 401),
        (dict(ok), None, 401),
        (None, b"{not json", 400),
        ({**ok, "model": "gpt-9"}, None, 404),
        ({**ok, "max_tokens": 0}, None, 400),
        ({**ok, "messages": image_msg(corrupt)}, None, 400),
        ({**ok, "messages": image_msg(bomb)}, None, 400),
        ({**ok, "messages": image_msg("https://example.com/a.png")}, None, 400),
        ({**ok, "messages": image_msg(str(tmp_path / "outside.png"))}, None, 403),
        ({**ok, "messages": [{"role": "user", "content": "word " * 20000}]}, None, 400),
        ({**ok, "temperature": -1}, None, 400),
        ({**ok, "messages": []}, None, 400),
    ]
    for i, (body, raw, status) in enumerate(cases):
        r = post(server, body, key={0: None, 1: "wrong-key"}.get(i, KEY), raw=raw)
        assert r.status_code == status, (i, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"]
    (tmp_path / "outside.png").write_bytes(b"x")  # outside: 403 whether or not the file exists
    r = post(server, {**ok, "messages": image_msg(str(tmp_path / "outside.png"))})
    assert r.status_code == 403
    assert post(server, ok).status_code == 200  # and the server keeps serving


def test_health_and_metrics(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    assert "nanovl_requests_total" in text and "nanovl_queue_depth 0" in text


def test_metrics_are_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families

    ok = {"model": "tiny-vl", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    assert post(server, ok).status_code == 200
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples}
    names = ["requests_total", "prompt_tokens_total", "generated_tokens_total", "cancelled_total", "errors_total",
             "queue_depth", "running", "time_to_first_token_seconds_sum", "time_to_first_token_seconds_count",
             "embed_store_hits_total", "embed_store_misses_total"]  # fmt: skip
    assert {f"nanovl_{n}" for n in names} <= set(samples)
    assert samples["nanovl_requests_total"] >= samples["nanovl_time_to_first_token_seconds_count"] >= 1


def test_disconnected_stream_frees_its_slot(server, client):
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny-vl", "messages": [{"role": "user", "content": "Hi"}], "stream": True,
                            "max_tokens": 5000, "ignore_eos": True}, timeout=60) as r:  # fmt: skip
        for line in r.iter_lines():
            if line.startswith("data:") and "content" in line:
                break  # the client goes away mid-stream
    deadline = time.time() + 20
    while time.time() < deadline:
        m = httpx.get(server.url + "/metrics").text
        if "nanovl_running 0" in m and "nanovl_cancelled_total 0" not in m:
            break
        time.sleep(0.2)
    assert "nanovl_running 0" in m and "nanovl_cancelled_total 0" not in m


def test_embedding_store_hits_and_survives_restart(vl, tmp_path):
    page = data_url(Image.effect_mandelbrot((700, 500), (-2, -1, 1, 1), 30).convert("RGB"))
    body = {"model": "tiny-vl", "messages": image_msg(page), "max_tokens": 4}
    outputs = []
    for round_ in range(2):  # the second server is a restart over the same folder
        s = LiveServer(create_app(vl, "tiny-vl", embed_store=str(tmp_path / "store")))
        try:
            for _ in range(2):
                r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
                assert r.status_code == 200, r.text
                outputs.append(r.json()["choices"][0]["message"]["content"])
            metrics = httpx.get(s.url + "/metrics").text
        finally:
            s.stop()
        values = dict(line.split() for line in metrics.splitlines() if not line.startswith("#"))
        hits, misses = (int(float(values[f"nanovl_embed_store_{k}_total"])) for k in ("hits", "misses"))
        # round 0: a miss, then a hit from memory; after the restart: a hit from disk, then from memory
        assert (hits, misses) == ((1, 1) if round_ == 0 else (2, 0))
    assert len(set(outputs)) == 1
    assert list((tmp_path / "store").rglob("*.safetensors"))


def test_image_embeds_part(vl, server):
    from safetensors.torch import save

    im = Image.new("RGB", (512, 512), (30, 60, 90))
    prompt = vl.prepare(vl.load_images(im), "Q")
    embeds = prompt.features.flatten(0, 1)  # (tiles * 256, hidden)
    part = lambda e: [
        {
            "role": "user",
            "content": [{"type": "image_embeds", "image_embeds": {"data": e}}, {"type": "text", "text": "\nQ"}],
        }
    ]  # noqa: E731
    good = base64.b64encode(save({"embeds": embeds.contiguous()})).decode()
    r = post(server, {"model": "tiny-vl", "messages": part(good), "max_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == vl.ask(im, "Q", max_new_tokens=5).text
    for bad in [embeds[:100], embeds[:, :10]]:
        data = base64.b64encode(save({"embeds": bad.contiguous()})).decode()
        r = post(server, {"model": "tiny-vl", "messages": part(data), "max_tokens": 5})
        assert r.status_code == 400 and "image_embeds must be" in r.json()["error"]["message"]
    assert post(server, {"model": "tiny-vl", "messages": part("###"), "max_tokens": 5}).status_code == 400


def test_json_schema_response_format(client, server):
    from test_constrained import SCHEMA

    rf = {"type": "json_schema", "json_schema": {"name": "fields", "schema": SCHEMA}}
    r = client.chat.completions.create(model="tiny-vl", messages=[{"role": "user", "content": "Fields?"}],
                                       max_tokens=120, response_format=rf)  # fmt: skip
    __import__("jsonschema").validate(json.loads(r.choices[0].message.content), SCHEMA)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}
    resp = post(server, {"model": "tiny-vl", "messages": [{"role": "user", "content": "x"}], "response_format": bad})
    assert resp.status_code == 400 and "invalid JSON schema" in resp.json()["error"]["message"]


def test_remote_private_address_and_full_queue(vl, monkeypatch):
    from test_remote_media import fake_dns

    fake_dns(monkeypatch, {"files.example": ["10.0.0.7"]})
    s = LiveServer(create_app(vl, "tiny-vl", allow_remote_media=True, max_concurrency=1, max_queue=1))
    try:
        r = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny-vl", "messages": image_msg("http://files.example/a.png")})  # fmt: skip
        assert r.status_code == 400 and "non-public address" in r.json()["error"]["message"]
        long = {"model": "tiny-vl", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400,
                "ignore_eos": True}  # fmt: skip
        with ThreadPoolExecutor(4) as pool:
            codes = list(
                pool.map(
                    lambda _: httpx.post(s.url + "/v1/chat/completions", json=long, timeout=120).status_code, range(4)
                )
            )
        assert 429 in codes and 200 in codes  # one runs, one waits, the rest are turned away
    finally:
        s.stop()


def test_video_url_part(client):
    from test_video import write_clip

    path = write_clip(__import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "c.mp4", 12)
    url = "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    msg = [
        {
            "role": "user",
            "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}],
        }
    ]
    r = client.chat.completions.create(model="tiny-vl", messages=msg, max_tokens=3)
    assert r.usage.prompt_tokens > 8 * 256  # 8 frames of one tile each


def test_body_limit_and_server_errors_in_openai_shape(vl):
    from nanovl.serve.protocol import Limits

    s = LiveServer(create_app(vl, "tiny-vl", limits=Limits(max_body_bytes=2048)))
    try:
        body = {"model": "tiny-vl", "messages": [{"role": "user", "content": "x" * 4096}]}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

        def chunks():  # no Content-Length: counted while read
            yield b'{"model": "tiny-vl", "messages": [{"role": "user", "content": "'
            for _ in range(8):
                yield b"x" * 512
            yield b'"}]}'

        r = httpx.post(s.url + "/v1/chat/completions", content=chunks(), timeout=30)
        assert r.status_code == 413
        sched = s.server.config.app.state.scheduler
        sched.step, real = (lambda: (_ for _ in ()).throw(RuntimeError("boom"))), sched.step
        r = httpx.post(s.url + "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "Hi"}]},
                       timeout=30)  # fmt: skip
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        sched.step = real
        ok = {"model": "tiny-vl", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert httpx.post(s.url + "/v1/chat/completions", json=ok, timeout=30).status_code == 200
        with httpx.stream("POST", s.url + "/v1/chat/completions", json={**ok, "stream": True}, timeout=30) as r:
            assert r.status_code == 200
        sched.step = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
        with httpx.stream("POST", s.url + "/v1/chat/completions", json={**ok, "stream": True}, timeout=30) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "{" in line]
        assert "error" in events[-1] and "boom" in events[-1]["error"]["message"]
        sched.step = real
        assert httpx.get(s.url + "/health", timeout=10).json()["status"] == "ok"
    finally:
        s.stop()


def test_one_validation_handler_for_bodies_and_declared_parameters(vl):
    from fastapi.testclient import TestClient

    app = create_app(vl, "tiny-vl")

    @app.get("/v1/probe")
    async def probe(n: int):  # a parameter FastAPI validates itself
        return {"n": n}

    client = TestClient(app)  # no lifespan: nothing here reaches the engine
    r = client.get("/v1/probe", params={"n": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert r.json()["error"]["message"].startswith("n: Input should be a valid integer")
    r = client.post("/v1/chat/completions", json={"model": "tiny-vl", "messages": [], "n": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "nanovl_errors_total 2.0" in client.get("/metrics").text
