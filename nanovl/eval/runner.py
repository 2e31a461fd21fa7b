"""The evaluation runner: a model folder or any OpenAI-compatible endpoint, one benchmark, resumable.

- Predictions are appended to `OUT/predictions.jsonl` as they come, one record per item with the
  prompt, the tile settings, the prediction and its score; a rerun skips the items already there.
- An item whose prediction failed (the endpoint erred or timed out, an image would not load) is
  recorded with its `error` and no score, counted apart, and retried on the next run: never scored
  as wrong.
- The end: `summary.json`, `results.md`, and `scores.png` (with matplotlib) beside reference numbers
  given with --reference (a JSON {task: score}).
- Greedy decoding; the local model decodes one item at a time (use --endpoint and a server for
  concurrency).
"""

from __future__ import annotations

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from nanovl.errors import NanovlError
from nanovl.eval.datasets import Item
from nanovl.eval.score import score_record, summarise


class LocalBackend:
    def __init__(self, model_dir: str, max_tiles: int | None = None):
        import nanovl
        from nanovl.api import VisionLanguageModel

        self.model = nanovl.load(model_dir)
        if not isinstance(self.model, VisionLanguageModel):
            raise NanovlError(f"{model_dir} is a text-only model; benchmarks need a vision-language checkpoint")
        self.max_tiles, self.lock = max_tiles, threading.Lock()
        self.name = Path(model_dir).resolve().name

    def predict(self, item: Item, max_tokens: int) -> tuple[str, dict]:
        sources = [p if isinstance(p, bytes) else str(p) for p in item.images]
        with self.lock:
            c = self.model.ask(sources, item.question, pages=item.pages, max_tiles=self.max_tiles,
                               max_new_tokens=max_tokens, temperature=0.0)  # fmt: skip
        return c.text.strip(), {"max_tiles": self.max_tiles or self.model.tiles.max_tiles}


class EndpointBackend:
    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 300):
        from nanovl.documents.backends import openai_client

        self.client, self.name = openai_client(url, api_key, model, timeout)

    def predict(self, item: Item, max_tokens: int) -> tuple[str, dict]:
        from nanovl.prompts import PLACEHOLDERS

        urls = [data_url(p) for p in item.images]
        part = lambda u: (
            {"type": "video_url", "video_url": {"url": u}}
            if u.startswith("data:video")
            else {  # noqa: E731
                "type": "image_url",
                "image_url": {"url": u},
            }
        )
        if PLACEHOLDERS["image"] in item.question:  # the question places its images itself
            pieces = item.question.split(PLACEHOLDERS["image"])
            parts = [{"type": "text", "text": pieces[0]}]
            for u, text in zip(urls, pieces[1:]):
                parts += [part(u), {"type": "text", "text": text}]
        else:
            parts = [part(u) for u in urls] + [
                {"type": "text", "text": "\n" + item.question if urls else item.question}
            ]
        r = self.client.chat.completions.create(
            model=self.name, messages=[{"role": "user", "content": parts}], max_tokens=max_tokens, temperature=0.0
        )
        return (r.choices[0].message.content or "").strip(), {"endpoint": str(self.client.base_url)}


def data_url(src: Path | bytes) -> str:
    from nanovl.media import is_video

    data = src if isinstance(src, bytes) else Path(src).read_bytes()
    if data[:5] == b"%PDF-":
        raise NanovlError(f"{src}: PDFs go to endpoints as file parts, which this runner does not send yet")
    kind = "video/mp4" if not isinstance(src, bytes) and is_video(src) else "image/png"
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def run(task: str, items: list[Item], backend, out_dir: str | Path, concurrency: int = 1, max_tokens: int = 32,
        reference: dict | None = None) -> dict:  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preds = out / "predictions.jsonl"
    done = {}
    if preds.is_file():
        for line in preds.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if "error" not in rec:
                    done[rec["id"]] = rec
    todo = [it for it in items if it.id not in done]
    lock = threading.Lock()
    failed = 0

    def work(item: Item) -> dict:
        images = [f"<{len(p)} bytes>" if isinstance(p, bytes) else str(p) for p in item.images]
        rec = {"id": item.id, "question": item.question, "images": images, **item.gold}
        try:
            prediction, settings = backend.predict(item, item.gold.get("max_tokens", max_tokens))
        except Exception as e:  # recorded and retried on the next run, never scored
            return {**rec, "error": f"{type(e).__name__}: {e}"}
        rec.update(prediction=prediction, settings=settings)
        rec.update(score_record(task, rec))
        return rec

    with open(preds, "a") as f, tqdm(total=len(items), initial=len(done), desc=task, unit="item") as bar:
        with ThreadPoolExecutor(max(concurrency, 1)) as pool:
            for fut in as_completed([pool.submit(work, it) for it in todo]):
                rec = fut.result()
                with lock:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                if "error" in rec:
                    failed += 1
                else:
                    done[rec["id"]] = rec
                bar.update(1)
    scored = [done[it.id] for it in items if it.id in done]
    summary = {**summarise(task, scored), "model": backend.name, "failed": len(items) - len(scored)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if task in ("docvqa", "infovqa"):  # the RRC submission format, for test splits scored by the organisers
        sub = [
            {"questionId": int(r["id"]) if r["id"].isdigit() else r["id"], "answer": r["prediction"]} for r in scored
        ]
        (out / "submission.json").write_text(json.dumps(sub, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(markdown(summary, reference))
    chart(summary, reference, out / "scores.png")
    return summary


def headline(summary: dict) -> float:
    return summary["final"] / 10 if "final" in summary else summary["score"]


def markdown(summary: dict, reference: dict | None) -> str:
    ref = (reference or {}).get(summary["task"])
    lines = ["| task | model | items | failed | score | published |", "|---|---|---|---|---|---|",
             f"| {summary['task']} | {summary['model']} | {summary['n']} | {summary['failed']} | "
             f"{headline(summary):.2f} | {'' if ref is None else ref} |"]  # fmt: skip
    return "\n".join(lines) + "\n"


def chart(summary: dict, reference: dict | None, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the table and the JSON carry the same numbers
    names, values = [summary["model"]], [headline(summary)]
    ref = (reference or {}).get(summary["task"])
    if ref is not None:
        names.append("published")
        values.append(float(ref))
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(names, values, color=["#4c72b0", "#999999"][: len(names)])
    ax.set_title(summary["task"])
    ax.set_ylabel("score")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
