"""Serving: aggregate throughput under concurrency, and time to first token cold vs from the store.

    python benchmarks/serve.py [--workdir /tmp/nanovl-bench] [--tokens 32]

1. Throughput: the ~1B Llama-shaped bf16 checkpoint of benchmarks/decode.py behind `nanovl serve`
   (in this process, on 127.0.0.1), greedy requests of `--tokens` new tokens sent by the official
   openai client from 1, 4 and 16 threads at once; aggregate output tokens/s over the whole wave.
2. Time to first token for one 13-tile page (a 1600x2000 page at up to 12 tiles + thumbnail): a
   VLM in the 8B's layout with a ViT-B/16 RADIO encoder (random weights), first cold, then the same
   page again, served from the vision-embedding store.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Server:
    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}/v1"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def throughput(workdir: Path, tokens: int):
    from openai import OpenAI

    import nanovl
    from nanovl.serve.app import create_app

    sys.path.insert(0, str(Path(__file__).parent))
    from decode import ensure_checkpoint

    model = nanovl.load(ensure_checkpoint(workdir), "bfloat16")
    server = Server(create_app(model, "llama-1b", max_concurrency=16, max_len=512))
    client = OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=600)

    def one(i):
        r = client.chat.completions.create(
            model="llama-1b", messages=[{"role": "user", "content": f"Request {i}: summarise the invoice."}],
            max_tokens=tokens, extra_body={"ignore_eos": True},
        )  # fmt: skip
        return r.usage.completion_tokens

    one(0)  # warm-up
    print(f"throughput: 1.24 B Llama-shaped, bf16, {tokens} new tokens per request, greedy")
    print(f"{'concurrency':>12} {'requests':>9} {'seconds':>8} {'output tok/s':>13} {'x concurrency 1':>16}")
    base = None
    try:
        for c in (1, 4, 16):
            n = max(c, 2)
            with ThreadPoolExecutor(c) as pool:
                t0 = time.perf_counter()
                total = sum(pool.map(one, range(n)))
                dt = time.perf_counter() - t0
            rate = total / dt
            base = base or rate
            print(f"{c:>12} {n:>9} {dt:>8.1f} {rate:>13.2f} {rate / base:>16.2f}")
    finally:
        server.stop()


def warm_vs_cold(workdir: Path):
    from openai import OpenAI
    from PIL import Image

    import nanovl
    from nanovl.serve.app import create_app
    from nanovl.tiny import write_checkpoint

    path = workdir / "vl-vitb"
    if not (path / "model.safetensors").is_file():
        vit_b = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
        write_checkpoint("nemotron-nano-vl-v1", path, vision=vit_b, dtype="bfloat16")
    model = nanovl.load(path)
    server = Server(create_app(model, "vl", embed_store=str(workdir / "store-bench")))
    client = OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=1200)
    page = Image.effect_mandelbrot((1600, 2000), (-2, -1.2, 1, 1.2), 80).convert("RGB")
    buf = io.BytesIO()
    page.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is the total?"}]}]  # fmt: skip

    def ttft():
        t0 = time.perf_counter()
        stream = client.chat.completions.create(model="vl", messages=messages, max_tokens=4, stream=True)
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - t0
        return first or (time.perf_counter() - t0)

    import shutil

    shutil.rmtree(workdir / "store-bench", ignore_errors=True)
    try:
        cold = ttft()
        warm = ttft()
    finally:
        server.stop()
    print(f"\ntime to first token, 13-tile page, ViT-B/16 RADIO + tiny LM (bf16): cold {cold:.2f} s, "
          f"warm (from the store) {warm:.2f} s: {cold / warm:.1f}x")  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/nanovl-bench")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    throughput(workdir, args.tokens)
    warm_vs_cold(workdir)


if __name__ == "__main__":
    main()
