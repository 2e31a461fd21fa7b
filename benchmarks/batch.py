"""Throughput of `nanovl batch --task convert` over the corpus, against a naive loop, in one run.

    python benchmarks/batch.py [--workdir /tmp/nanovl-bench] [--corpus ../shared/corpus] [--max-tokens 16]

Rows (a tiny random model, every image and PDF page of the corpus at 72 DPI, greedy, --max-tokens
new tokens per page):
- naive: one request per page to `nanovl serve`, sequential (render, send, wait; the next page);
- batch, local model, 1 worker and 2 worker processes;
- batch, --endpoint on the same server, 4 requests in flight.
Each figure is the command's whole wall time (model loading and worker start-up included), so it is
what a user waits for; the server is started once, before the timed rows that use it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def naive(url: str, docs: list[Path], max_tokens: int) -> int:
    """One chat request per page, one after the other; returns the pages done."""
    from nanovl.documents.backends import png_data_url
    from nanovl.documents.convert import PROMPT
    from nanovl.processor import scan_media

    n = 0
    with httpx.Client(timeout=600) as client:
        for doc in docs:
            for page in scan_media([doc], None, 72):
                parts = [{"type": "image_url", "image_url": {"url": png_data_url(page.load())}},
                         {"type": "text", "text": "\n" + PROMPT}]  # fmt: skip
                body = {"model": "tiny", "messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens,
                        "temperature": 0}  # fmt: skip
                r = client.post(url + "/v1/chat/completions", json=body)
                r.raise_for_status()
                n += 1
    return n


def batch(args: list[str], out: Path) -> None:
    out.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-m", "nanovl.cli", "batch", *args, "--out", str(out)], capture_output=True,
                       text=True)  # fmt: skip
    if r.returncode:
        sys.exit(f"nanovl batch failed:\n{r.stderr[-2000:]}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/nanovl-bench")
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus"))
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args()
    work = Path(args.workdir) / "batch"
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny-vl"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "nanovl.cli", "make-tiny", "nemotron-nano-vl-v1", str(model)], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    docs = sorted(p for p in Path(args.corpus).glob("*/*") if p.suffix.lower() in (".pdf", ".png", ".jpg", ".jpeg"))
    from nanovl.processor import scan_media

    pages = sum(len(scan_media([d], None, 72)) for d in docs)
    print(f"{len(docs)} documents, {pages} pages; tiny random model; {args.max_tokens} new tokens a page; "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    common = [*map(str, docs), "--task", "convert", "--max-tokens", str(args.max_tokens), "--dpi", "72"]
    port = free_port()
    serve = [sys.executable, "-m", "nanovl.cli", "serve", "--model", str(model), "--port", str(port),
             "--served-model-name", "tiny"]  # fmt: skip
    server = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                sys.exit("the server did not start")
            time.sleep(0.5)
        rows = []
        t = time.perf_counter()
        assert naive(url, docs, args.max_tokens) == pages
        rows.append(("naive loop (1 request per page, sequential)", time.perf_counter() - t))
        for name, extra in (
            ("batch, local, 1 worker", ["--model", str(model)]),
            ("batch, local, 2 workers", ["--model", str(model), "--workers", "2"]),
            ("batch, --endpoint, 4 in flight", ["--endpoint", url + "/v1", "--concurrency", "4"]),
        ):
            t = time.perf_counter()
            batch([*common, *extra], work / "out.jsonl")
            seconds = time.perf_counter() - t
            done = [json.loads(x) for x in (work / "out.jsonl").read_text().splitlines()]
            assert len(done) == len(docs) and not any("error" in r for r in done), name
            rows.append((name, seconds))
    finally:
        server.terminate()
        server.wait(30)
    base = pages / rows[0][1]
    print(f"{'':46} {'seconds':>8} {'pages/s':>8} {'vs naive':>9}")
    for name, seconds in rows:
        print(f"{name:46} {seconds:>8.1f} {pages / seconds:>8.2f} {pages / seconds / base:>9.2f}")


if __name__ == "__main__":
    main()
