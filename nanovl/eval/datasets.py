"""Benchmark files as they are distributed, read locally (nothing is downloaded).

Each loader yields `Item`s: an id, the question, the image paths, and the gold fields that
eval/score.py reads. A missing file gets a message saying which file is expected where.

- docvqa / infovqa: the RRC JSON (`val_v1.0_withQT.json`, `infographicsVQA_val_v1.0_withQT.json`),
  {"data": [{questionId, question, image | image_local_name, answers}]}; images beside it (or --images).
- chartqa: the `test` folder of the ChartQA repo: test_human.json and test_augmented.json
  ([{imgname, query, label}]) and png/<imgname>.
- ocrbench: `OCRBench.json` ([{dataset_name, id, image_path, question, answers, type}]) and the
  OCRBench_Images folder (--images).
- textvqa: `TextVQA_0.5.1_val.json` ({"data": [{question_id, question, image_id, answers}]}) and
  train_images/<image_id>.jpg.
- corpus: ../shared/corpus/qa.jsonl ({file, question, answers}), files relative to it.
- jsonl (any task's gold fields): one record per line with `id`, `question`, `image` (or `images`),
  relative to the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nanovl.errors import DataError

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."


def options_text(options: list[str]) -> str:
    return "".join(f"\n{chr(ord('A') + i)}. {o}" for i, o in enumerate(options))


def _parquet_rows(path: Path, pattern: str, expected: str) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("parquet exports need pyarrow: pip install 'nanovl[eval]'") from None
    files = [path] if path.is_file() else sorted(path.glob(pattern))
    if not files:
        raise DataError(f"{path}: no parquet files ({pattern}); expected {expected}")
    for f in files:
        yield from pq.read_table(f).to_pylist()


def _image_bytes(cell) -> bytes:
    return cell["bytes"] if isinstance(cell, dict) else cell


@dataclass
class Item:
    id: str
    question: str
    images: list[Path | bytes]  # files, or image bytes from a parquet export
    gold: dict = field(default_factory=dict)
    pages: str | None = None


def _read_json(path: Path, expected: str):
    if not path.is_file():
        raise DataError(f"{path}: not found; expected {expected}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); expected {expected}") from None


def _image(root: Path, rel: str, item_id) -> Path:
    path = root / rel
    if not path.is_file():
        raise DataError(f"item {item_id}: image {path} is missing")
    return path


def docvqa(path: Path, images: Path | None = None, info: bool = False) -> Iterator[Item]:
    name = "infographicsVQA_val_v1.0_withQT.json" if info else "val_v1.0_withQT.json"
    path = path / name if path.is_dir() else path
    data = _read_json(path, f"the RRC {'InfographicVQA' if info else 'DocVQA'} JSON ({name})")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: expected {{'data': [...]}} as in {name}")
    root = images or path.parent
    for q in data["data"]:
        try:
            rel = q.get("image") or q["image_local_name"]
            yield Item(str(q["questionId"]), q["question"] + SHORT_ANSWER, [_image(root, rel, q["questionId"])],
                       {"answers": q.get("answers", [])})  # fmt: skip
        except KeyError as e:
            raise DataError(f"{path}: a question lacks {e}; expected the {name} format") from None


def chartqa(path: Path, images: Path | None = None) -> Iterator[Item]:
    for split in ("human", "augmented"):
        f = path / f"test_{split}.json"
        rows = _read_json(f, "ChartQA's test folder with test_human.json, test_augmented.json and png/")
        if not isinstance(rows, list):
            raise DataError(f"{f}: expected a list of {{imgname, query, label}}")
        for i, r in enumerate(rows):
            try:
                img = _image(images or path / "png", r["imgname"], f"{split}-{i}")
                yield Item(f"{split}-{i}", r["query"] + SHORT_ANSWER, [img], {"label": r["label"], "split": split})
            except KeyError as e:
                raise DataError(f"{f}: row {i} lacks {e}; expected {{imgname, query, label}}") from None


def ocrbench(path: Path, images: Path | None = None) -> Iterator[Item]:
    path = path / "OCRBench.json" if path.is_dir() else path
    rows = _read_json(path, "OCRBench.json from MultimodalOCR/OCRBench/json_files")
    root = images or path.parent / "OCRBench_Images"
    for r in rows:
        try:
            yield Item(str(r["id"]), r["question"], [_image(root, r["image_path"], r["id"])],
                       {"answers": r["answers"], "dataset_name": r["dataset_name"], "type": r["type"]})  # fmt: skip
        except KeyError as e:
            raise DataError(f"{path}: an item lacks {e}; expected the OCRBench.json format") from None


def textvqa(path: Path, images: Path | None = None) -> Iterator[Item]:
    path = path / "TextVQA_0.5.1_val.json" if path.is_dir() else path
    data = _read_json(path, "TextVQA_0.5.1_val.json from textvqa.org")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: expected {{'data': [...]}} as in TextVQA_0.5.1_val.json")
    root = images or path.parent / "train_images"
    for q in data["data"]:
        try:
            img = _image(root, f"{q['image_id']}.jpg", q["question_id"])
            yield Item(str(q["question_id"]), q["question"] + SHORT_ANSWER, [img], {"answers": q["answers"]})
        except KeyError as e:
            raise DataError(f"{path}: a question lacks {e}; expected the TextVQA_0.5.1_val.json format") from None


def ai2d(path: Path, images: Path | None = None) -> Iterator[Item]:
    """The AI2D release (questions/<n>.png.json + images/), or the lmms-lab parquet export
    ({question, options, answer: "0".."3", image}). A `test_ids.txt` beside questions/ limits the
    release to the test split."""
    if path.is_dir() and (path / "questions").is_dir():
        wanted = None
        if (path / "test_ids.txt").is_file():
            wanted = set((path / "test_ids.txt").read_text().split())
        for f in sorted((path / "questions").glob("*.json")):
            doc = _read_json(f, "AI2D questions/<n>.png.json")
            image = _image(images or path / "images", doc["imageName"], f.name)
            if wanted is not None and doc["imageName"].split(".")[0] not in wanted:
                continue
            for text, q in doc["questions"].items():
                opts = q["answerTexts"]
                gold = {"options": opts, "answer": chr(ord("A") + int(q["correctAnswer"]))}
                yield Item(q["questionId"], text + options_text(opts) + LETTER_ANSWER, [image], gold)
        return
    for i, r in enumerate(_parquet_rows(path, "**/*.parquet", "AI2D (questions/ + images/) or its parquet export")):
        opts = list(r["options"])
        gold = {"options": opts, "answer": str(r["answer"])}
        yield Item(
            str(r.get("id", i)), r["question"] + options_text(opts) + LETTER_ANSWER, [_image_bytes(r["image"])], gold
        )


def mmmu(path: Path, images: Path | None = None) -> Iterator[Item]:
    """HF MMMU/MMMU parquet (one folder per subject; validation split): <image k> tags become
    placeholders, images in the order the question names them."""
    import ast
    import re

    for r in _parquet_rows(path, "**/validation-*.parquet", "the MMMU/MMMU parquet files (validation split)"):
        opts = ast.literal_eval(r["options"]) if isinstance(r["options"], str) else list(r["options"] or [])
        order = [int(k) for k in re.findall(r"<image (\d)>", r["question"])]
        imgs = [_image_bytes(r[f"image_{k}"]) for k in order if r.get(f"image_{k}")]
        question = re.sub(r"<image \d>", "<image>", r["question"])
        if not order:  # images the question does not place go first
            imgs = [_image_bytes(r[f"image_{k}"]) for k in range(1, 8) if r.get(f"image_{k}")]
        open_ended = r.get("question_type") == "open"
        prompt = question + ("" if open_ended else options_text(opts)) + (SHORT_ANSWER if open_ended else LETTER_ANSWER)
        gold = {"options": opts, "answer": r["answer"], "question_type": r.get("question_type"),
                "subject": r["id"].split("_")[1] if r["id"].count("_") >= 2 else ""}  # fmt: skip
        yield Item(r["id"], prompt, imgs, gold)


def videomme(path: Path, images: Path | None = None) -> Iterator[Item]:
    """lmms-lab/Video-MME parquet and the videos (--images DIR holding <videoID>.mp4)."""
    root = images or path.parent / "videos" if path.is_file() else (images or path / "videos")
    for r in _parquet_rows(path, "**/*.parquet", "the lmms-lab/Video-MME parquet file(s)"):
        video = _image(root, f"{r['videoID']}.mp4", r["question_id"])
        prompt = ("Select the best answer to the following multiple-choice question based on the video.\n"
                  + r["question"] + "".join("\n" + o for o in r["options"]) + LETTER_ANSWER)  # fmt: skip
        yield Item(str(r["question_id"]), prompt, [video], {"answer": r["answer"], "duration": r.get("duration")})


def corpus(path: Path, images: Path | None = None) -> Iterator[Item]:
    path = path / "qa.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path}: not found; expected the shared corpus qa.jsonl")
    for n, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            r = json.loads(line)
            f = _image(path.parent, r["file"], n)
            yield Item(f"{n}", r["question"] + SHORT_ANSWER, [f], {"answers": r["answers"]})


def jsonl(path: Path, images: Path | None = None) -> Iterator[Item]:
    if not path.is_file():
        raise DataError(f"{path}: not found; expected JSONL records with id, question and image")
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        files = r.get("images") or [r["image"]]
        gold = {k: v for k, v in r.items() if k not in ("id", "question", "image", "images")}
        yield Item(str(r.get("id", n)), r["question"], [_image(images or path.parent, f, n) for f in files], gold)


LOADERS = {
    "docvqa": docvqa,
    "infovqa": lambda p, images=None: docvqa(p, images, info=True),
    "chartqa": chartqa,
    "ocrbench": ocrbench,
    "textvqa": textvqa,
    "ai2d": ai2d,
    "mmmu": mmmu,
    "videomme": videomme,
    "corpus": corpus,
}


# lmms-lab / HF parquet exports: question field, gold fields, image column
PARQUET_FIELDS = {
    "docvqa": ("questionId", "question", lambda r: {"answers": list(r["answers"])}, SHORT_ANSWER),
    "infovqa": ("questionId", "question", lambda r: {"answers": list(r["answers"])}, SHORT_ANSWER),
    "chartqa": (None, "question", lambda r: {"label": r["answer"], "split": str(r.get("type", "")).split("_")[0]},
                SHORT_ANSWER),
    "textvqa": ("question_id", "question", lambda r: {"answers": list(r["answers"])}, SHORT_ANSWER),
    "ocrbench": (None, "question", lambda r: {"answers": r["answer"], "dataset_name": r.get("dataset", ""),
                                              "type": r.get("question_type", "")}, ""),
}  # fmt: skip


def parquet(task: str, path: Path) -> Iterator[Item]:
    key, question, gold, suffix = PARQUET_FIELDS[task]
    for i, r in enumerate(_parquet_rows(path, "**/*.parquet", f"the {task} parquet export")):
        try:
            yield Item(str(r[key] if key else i), r[question] + suffix, [_image_bytes(r["image"])], gold(r))
        except KeyError as e:
            raise DataError(f"{path}: row {i} lacks {e}; expected the lmms-lab {task} parquet columns") from None


def load(task: str, path: str | Path, images: str | Path | None = None) -> list[Item]:
    path, images = Path(path), Path(images) if images else None
    if path.suffix == ".jsonl" and task != "corpus":
        return list(jsonl(path, images))
    is_parquet = path.suffix == ".parquet" or (path.is_dir() and any(path.glob("**/*.parquet")))
    if task in PARQUET_FIELDS and is_parquet:
        return list(parquet(task, path))
    if task not in LOADERS:
        raise DataError(f"no loader for {task!r} yet; give a .jsonl of records, or one of {', '.join(LOADERS)}")
    return list(LOADERS[task](path, images))
