"""Scoring predictions made anywhere: `nanovl eval score TASK --predictions FILE`.

The file is JSONL, one record per question, holding the gold fields of the task and a `prediction`.
Each record gets its `score` (1/0, or ANLS in [0, 1]); the records are written back beside the input
(`FILE.scored.jsonl`), and the summary is returned in points, 0-100 (means x 100: every figure, CER
too), except OCRBench's `final`, hits out of 1000 (its `norm` is final / 10).

Gold fields by task:
- docvqa, infovqa: `answers` (list) -> ANLS
- chartqa: `answer` or `label` (one gold), or `answers` (a list: the best match), optional `split` -> relaxed accuracy
- ocrbench: `answers` (str or list), `dataset_name`, `type` -> OCRBench v1 hit
- textvqa: `answers` (the 10 annotators') -> VQA accuracy with EvalAI processing
- ai2d: `options` (list or {letter: text}), `answer` (letter or index) -> choice_letter
- mmmu: `question_type`, `options` (list or its string repr), `answer` -> official MMMU parsers
- videomme: `answer` (letter), optional `duration` -> official Video-MME extractor
- corpus: `answers` -> ANLS, and containment (a normalised gold inside the prediction)
- synthdocs (`nanovl synth --split eval` -> eval.jsonl): `answers`, `type` -> ANLS for extractive,
  exact match for arithmetic / chart, the letter for choice, 1 - CER (capped at 0) for transcription;
  the summary gives each type's figure (transcription as mean CER) and the mean of all scores.
"""

from __future__ import annotations

import ast
import json
from collections import defaultdict
from pathlib import Path

from nanovl.errors import NanovlError
from nanovl.eval import metrics as M

TASKS = ("docvqa", "infovqa", "chartqa", "ocrbench", "textvqa", "ai2d", "mmmu", "videomme", "corpus", "synthdocs")
SYNTH_FIGURES = {"extractive": "anls", "arithmetic": "accuracy", "chart": "accuracy", "choice": "accuracy"}


def _options(rec) -> dict[str, str]:
    opts = rec.get("options")
    if isinstance(opts, str):
        opts = ast.literal_eval(opts)
    if isinstance(opts, dict):
        return {str(k): str(v) for k, v in opts.items()}
    return {chr(ord("A") + i): str(v) for i, v in enumerate(opts or [])}


def _gold_letter(answer) -> str:
    s = str(answer).strip()
    return chr(ord("A") + int(s)) if s.isdigit() else s.upper()


def score_record(task: str, rec: dict) -> dict:
    """The record's score fields for `task`."""
    pred = str(rec.get("prediction", ""))
    if task in ("docvqa", "infovqa"):
        return {"score": M.anls(pred, list(rec["answers"]))}
    if task == "chartqa":  # one gold (`answer`, or `label` as in the release), or a list like the others
        golds = rec.get("answer", rec.get("label", rec.get("answers")))
        if golds is None:
            raise KeyError("a chartqa record needs `answer`, `label` or `answers`")
        golds = golds if isinstance(golds, list) else [golds]
        return {"score": float(max(M.relaxed_accuracy(pred, str(g)) for g in golds))}
    if task == "textvqa":
        return {"score": M.vqa_accuracy(pred, list(rec["answers"]))}
    if task == "ocrbench":
        return {"score": float(M.ocrbench_hit(pred, rec["answers"], rec.get("dataset_name", "")))}
    if task == "ai2d":
        return {"score": float(M.choice_letter(pred, _options(rec)) == _gold_letter(rec["answer"]))}
    if task == "mmmu":
        if rec.get("question_type") == "open":
            answer = rec["answer"]
            if isinstance(answer, str) and answer.startswith("["):
                answer = ast.literal_eval(answer)
            return {"score": float(M.mmmu_open_correct(pred, answer))}
        return {"score": float(M.mmmu_choice(pred, _options(rec)) == _gold_letter(rec["answer"]))}
    if task == "videomme":
        return {"score": float(M.videomme_choice(pred) == _gold_letter(rec["answer"]))}
    if task == "corpus":
        golds = [str(a) for a in rec["answers"]]
        norm = lambda s: " ".join(s.lower().split())  # noqa: E731
        return {"score": M.anls(pred, golds), "contains": float(any(norm(g) in norm(pred) for g in golds))}
    if task == "synthdocs":
        gold, kind = str(rec["answers"][0]), rec["type"]
        if kind == "transcription":
            c = M.cer(pred, gold)
            return {"score": max(0.0, 1 - c), "cer": c}
        if kind == "extractive":
            return {"score": M.anls(pred, [gold])}
        if kind == "choice":
            return {"score": float(pred.strip().upper()[:1] == gold)}
        return {"score": float(M.exact_answer(pred, gold))}
    raise NanovlError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def summarise(task: str, records: list[dict]) -> dict:
    if not records:
        raise NanovlError("no records to score")
    if task == "ocrbench":
        hits = defaultdict(int)
        for r in records:
            hits[r.get("type", "unknown")] += int(r["score"])
        return {"task": task, "n": len(records), **M.ocrbench_score(dict(hits))}
    out = {"task": task, "n": len(records), "score": 100 * sum(r["score"] for r in records) / len(records)}
    group = {"chartqa": "split", "videomme": "duration", "mmmu": "question_type"}.get(task)
    if group:
        groups = defaultdict(list)
        for r in records:
            groups[str(r.get(group, "all"))].append(r["score"])
        out[group] = {k: 100 * sum(v) / len(v) for k, v in sorted(groups.items())}
    if task == "corpus":
        out["contains"] = 100 * sum(r["contains"] for r in records) / len(records)
    if task == "synthdocs":
        for kind, figure in SYNTH_FIGURES.items():
            scores = [r["score"] for r in records if r["type"] == kind]
            if scores:
                out[f"{figure}_{kind}"] = 100 * sum(scores) / len(scores)
        cers = [min(1.0, r["cer"]) for r in records if r["type"] == "transcription"]
        if cers:
            out["cer_transcription"] = 100 * sum(cers) / len(cers)
        out["n_by_type"] = {k: sum(r["type"] == k for r in records) for k in sorted({r["type"] for r in records})}
    return out


def score_file(task: str, path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise NanovlError(f"{path}: no such predictions file (JSONL with the gold fields and `prediction`)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rec.update(score_record(task, rec))
        except (json.JSONDecodeError, KeyError, ValueError, SyntaxError) as e:
            raise NanovlError(f"{path}:{n}: not a {task} record ({type(e).__name__}: {e})") from None
        records.append(rec)
    out = path.with_name(path.stem + ".scored.jsonl")
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return summarise(task, records)
