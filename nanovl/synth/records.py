"""Synthetic documents -> training conversations and evaluation records (`nanovl synth`).

A training record is one JSON line:
  {"id": ..., "images": ["images/x.png", ...], "messages": [{"role": "user", "content": "<image>\\n..."},
   {"role": "assistant", "content": "..."}, ...], "meta": {"kind", "seed", "split", "task"}}
with image paths relative to the JSONL file and one `<image>` placeholder per image, in order.

Tasks (one file each, so a stage config picks what it trains on):
- transcribe: the document's full text (stage 1: image-text pairs).
- interleaved: several documents (or the pages of one) alternating image and text (stage 2).
- qa: every question about a document as one multi-turn conversation, in a random order (stage 3).
- extract: the key-value fields as JSON (stage 3).
- text: text-only instructions (arithmetic, reading a snippet, JSON, sorting) for the re-blend.
- crops (with `--crops N`): N crops of each page, each with the text inside it: a cheap way to learn
  to read before whole pages.
An evaluation split (seeds >= EVAL_SEED_START) also writes eval.jsonl: one record per question,
plus one transcription item per document, in the evaluation harness's jsonl format.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from nanovl.errors import NanovlError
from nanovl.synth.kinds import (
    CITIES,
    EVAL_SEED_START,
    FIRST,
    GROCERY,
    KINDS,
    LAST,
    Doc,
    company,
    make_doc,
    random_string,
)
from nanovl.synth.render import Page, rotate_points

TASKS = ("transcribe", "interleaved", "qa", "extract", "text")  # crops: on request (`--crops N`)
CROP_SIZES = ((256, 256), (256, 256), (512, 256), (512, 512))  # (w, h), drawn uniformly
TRANSCRIBE = "Transcribe the text of this document."
EXTRACT = "Extract the key fields of this document as JSON."
COPY = "Copy this text exactly:"


def question_order(kind: str, seed: int, qa: list) -> list:
    """The document's questions in a per-document random order, so that every question is sometimes
    the first turn (as it is when asked alone)."""
    qa = list(qa)
    random.Random(f"qa-order:{kind}:{seed}").shuffle(qa)
    return qa


def doc_records(doc: Doc, paths: list[str], split: str) -> dict[str, list[dict]]:
    meta = {"kind": doc.kind, "seed": doc.seed, "split": split}
    images = "".join("<image>\n" for _ in paths)
    out = {
        "transcribe": [
            _conv(
                f"{doc.kind}-{doc.seed}-t",
                paths,
                [images + TRANSCRIBE, doc.transcription],
                {**meta, "task": "transcribe"},
            )
        ],
        "extract": [
            _conv(
                f"{doc.kind}-{doc.seed}-x",
                paths,
                [images + EXTRACT, json.dumps(doc.fields)],
                {**meta, "task": "extract"},
            )
        ],
    }
    turns = []
    for k, q in enumerate(question_order(doc.kind, doc.seed, doc.qa)):
        turns += [(images if k == 0 else "") + q["question"], q["answer"]]
    out["qa"] = [_conv(f"{doc.kind}-{doc.seed}-q", paths, turns, {**meta, "task": "qa"})]
    # pages alternate with their text; a one-page document is grouped with others by `interleave`
    turns = [t for p, page in zip(paths, doc.clean) for t in ("<image>", page.transcription)]
    out["interleaved"] = [_conv(f"{doc.kind}-{doc.seed}-i", paths, turns, {**meta, "task": "interleaved"})]
    return out


def _conv(rid: str, images: list[str], turns: list[str], meta: dict) -> dict:
    roles = ("user", "assistant")
    messages = [{"role": roles[k % 2], "content": t} for k, t in enumerate(turns)]
    return {"id": rid, "images": images, "messages": messages, "meta": meta}


def interleave(records: list[dict], rng: random.Random, per: int = 3) -> list[dict]:
    """Group single-page interleaved records into conversations of up to `per` documents."""
    records = records[:]
    rng.shuffle(records)
    out = []
    for k in range(0, len(records), per):
        group = records[k : k + per]
        out.append({
            "id": "+".join(r["id"] for r in group),
            "images": [p for r in group for p in r["images"]],
            "messages": [m for r in group for m in r["messages"]],
            "meta": {**group[0]["meta"], "kind": "+".join(r["meta"]["kind"] for r in group)},
        })  # fmt: skip
    return out


def eval_records(doc: Doc, paths: list[str]) -> list[dict]:
    base = {"images": paths, "kind": doc.kind, "seed": doc.seed}
    recs = [{"id": f"{doc.kind}-{doc.seed}-{k}", "question": q["question"], "answers": [q["answer"]],
             "type": q["type"], **base} for k, q in enumerate(doc.qa)]  # fmt: skip
    recs.append({"id": f"{doc.kind}-{doc.seed}-t", "question": TRANSCRIBE, "answers": [doc.transcription],
                 "type": "transcription", "max_tokens": 1024, **base})  # fmt: skip
    return recs


def copy_instruction(seed: int, split: str = "train") -> dict:
    """One text-only copy task: lines of random strings to repeat exactly (deterministic per seed); a
    decoder trained from scratch learns copying from its context here, on text alone."""
    rng = random.Random(f"copy:{seed}")
    text = "\n".join(" ".join(random_string(rng) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 6)))
    meta = {"kind": "copy", "seed": seed, "split": split, "task": "copy"}
    return _conv(f"copy-{seed}", [], [f"{COPY}\n{text}", text], meta)


def text_instruction(seed: int, split: str = "train") -> dict:
    """One text-only instruction sample (deterministic per seed)."""
    rng = random.Random(f"text:{seed}")
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    person, city = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(CITIES)
    nums = rng.sample(range(1, 100), rng.randint(3, 6))
    items = rng.sample(GROCERY, 3)
    kind = rng.randrange(6)
    if kind == 0:
        q, ans = f"What is {a} + {b}?", str(a + b)
    elif kind == 1:
        q, ans = f"What is {a} minus {b}?", str(a - b)
    elif kind == 2:
        vendor, total = company(rng), f"{a}.{b:02d}"
        q = f"Invoice from {vendor}, amount due {total}, customer {person}. Who is the customer?"
        ans = person
    elif kind == 3:
        q = f"Write the name and the city as JSON with keys name and city. Name: {person}. City: {city}."
        ans = json.dumps({"name": person, "city": city})
    elif kind == 4:
        q, ans = f"Sort from smallest to largest: {', '.join(map(str, nums))}", ", ".join(map(str, sorted(nums)))
    else:
        q, ans = f"How many items are in this list: {', '.join(items)}?", str(len(items))
    return _conv(f"text-{seed}-s", [], [q, ans], {"kind": "text", "seed": seed, "split": split, "task": "text"})


def crop_text(page: Page, angle: float, size: tuple[int, int], box: tuple[int, int, int, int]) -> str:
    """The text whose characters have their centres inside `box` of the delivered (rotated) page, line
    by line; the parts of one line keep the line's separator."""
    x0, y0, x1, y1 = box
    lines = []
    for line in page.lines:
        parts = []
        for item in line.items:
            inside = "".join(c for x, y, c in rotate_points(item.glyphs(), angle, size)
                             if x0 <= x < x1 and y0 <= y < y1).strip()  # fmt: skip
            parts += [inside] if inside else []
        lines += [line.sep.join(parts)] if parts else []
    return "\n".join(lines)


def crop_records(doc: Doc, out: Path, per_page: int, split: str) -> list[dict]:
    """`per_page` crops of each page, each a whole number of tiles at the model's usual scale (256 or 512
    px a side), placed around a random character, with the text inside as the transcription."""
    rng = random.Random(f"crops:{doc.kind}:{doc.seed}")
    records = []
    for i, (im, page, angle) in enumerate(zip(doc.pages, doc.clean, doc.angles)):
        glyphs = [g for item in page.items for g in item.chars()]
        for k in range(per_page if glyphs else 0):
            w, h = (min(v, side) for v, side in zip(rng.choice(CROP_SIZES), im.size))
            cx, cy, _ = rotate_points([rng.choice(glyphs)], angle, im.size)[0]
            x0 = int(min(max(0, cx - rng.uniform(0.1, 0.9) * w), im.width - w))
            y0 = int(min(max(0, cy - rng.uniform(0.1, 0.9) * h), im.height - h))
            box = (x0, y0, x0 + w, y0 + h)
            text = crop_text(page, angle, im.size, box)
            if not text:
                continue
            rel = f"images/{doc.kind}-{doc.seed}-p{i + 1}-c{k}.png"
            im.crop(box).save(out / rel, compress_level=1)
            meta = {"kind": doc.kind, "seed": doc.seed, "split": split, "task": "crops"}
            records.append(_conv(f"{doc.kind}-{doc.seed}-p{i + 1}-c{k}", [rel], ["<image>\n" + TRANSCRIBE, text], meta))
    return records


def _render(args) -> tuple[str, list[dict], dict[str, list[dict]]]:
    kind, seed, out, split, strength, crops, pdf = args
    doc = make_doc(kind, seed, strength)
    paths = []
    for i, page in enumerate(doc.pages):
        rel = f"images/{kind}-{seed}-p{i + 1}.png"
        page.save(out / rel, compress_level=1)  # fast; the files are scratch data
        paths.append(rel)
    records = doc_records(doc, paths, split)
    if crops:
        records["crops"] = crop_records(doc, out, crops, split)
    if pdf:
        from nanovl.synth.pdf import pdf_truth, write_pdf

        rel = f"pdf/{kind}-{seed}.pdf"
        write_pdf(doc, out / rel)
        records["pdf"] = [{"id": f"{kind}-{seed}", "file": rel, "kind": kind, "seed": seed, "split": split,
                           **pdf_truth(doc)}]  # fmt: skip
    return kind, eval_records(doc, paths) if split == "eval" else [], records


def write_dataset(
    out: str | Path,
    count: int,
    kinds: list[str] = KINDS,
    start: int = 0,
    split: str = "train",
    text_count: int = 0,
    augment: float = 1.0,
    workers: int = 1,
    crops: int = 0,
    copy_count: int = 0,
    pdf: bool = False,
) -> dict[str, int]:
    """Render `count` documents per kind with seeds start.. (eval: EVAL_SEED_START + start..) into
    OUT/images and the task JSONL files (with `crops` > 0, also that many crops per page in
    crops.jsonl; `text_count` text instructions in text.jsonl, `copy_count` copy tasks in copy.jsonl;
    with `pdf`, each document also as a digital PDF in OUT/pdf, its fields and their drawn boxes in
    pdf.jsonl); returns the record count per file."""
    if split not in ("train", "eval"):
        raise NanovlError(f"split must be train or eval, not {split!r}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise NanovlError(f"unknown document kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    first = start + (EVAL_SEED_START if split == "eval" else 0)
    if split == "train" and first + count > EVAL_SEED_START:
        raise NanovlError(f"training seeds must stay below {EVAL_SEED_START} (reserved for evaluation)")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if pdf:
        (out / "pdf").mkdir(exist_ok=True)
    jobs = [(k, s, out, split, augment, crops, pdf) for s in range(first, first + count) for k in kinds]
    per_task: dict[str, list[dict]] = {t: [] for t in (*TASKS, "crops", "pdf")}
    evals = []
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    results = pool.map(_render, jobs, chunksize=8) if pool else map(_render, jobs)
    for _, ev, recs in tqdm(results, total=len(jobs), desc="nanovl synth", unit="doc", mininterval=1):
        evals += ev
        for task, rs in recs.items():
            per_task[task] += rs
    if pool:
        pool.shutdown()
    rng = random.Random(f"interleave:{split}:{first}")
    single = [r for r in per_task["interleaved"] if len(r["images"]) == 1]
    per_task["interleaved"] = [r for r in per_task["interleaved"] if len(r["images"]) > 1] + interleave(single, rng)
    per_task["text"] = [text_instruction(s, split) for s in range(first, first + text_count)]
    per_task["copy"] = [copy_instruction(s, split) for s in range(first, first + copy_count)]
    counts = {}
    for task, rs in per_task.items():
        if rs:
            counts[f"{task}.jsonl"] = _write_jsonl(out / f"{task}.jsonl", rs)
    if evals:
        counts["eval.jsonl"] = _write_jsonl(out / "eval.jsonl", evals)
    return counts


def _write_jsonl(path: Path, records: list[dict]) -> int:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return len(records)
