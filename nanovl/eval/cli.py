"""The evaluation commands of `nanovl`: eval [run] TASK and eval score TASK (parsers and thin handlers)."""

from __future__ import annotations

import json
from pathlib import Path

from nanovl.errors import NanovlError


def olmocr_bench(args, pages_from=None):
    """`eval olmocr-bench`: convert the pages the tests are about (or read --predictions), score them."""
    from tqdm import tqdm

    from nanovl.eval import olmocr

    if not args.data:
        raise NanovlError("--data DIR is required: olmOCR-Bench's *.jsonl files with its PDFs (in pdfs/ or beside)")
    data = Path(args.data)
    tests = olmocr.load_tests(data)
    out = Path(getattr(args, "out", None) or "eval-olmocr-bench")
    if pages_from is not None:
        pages = olmocr.read_pages(tests, Path(pages_from))
    else:
        from nanovl.documents.connect import open_backend

        backend = open_backend(args.model, args.endpoint, args.api_key, None)
        n = len({(t.pdf, t.page) for t in tests})
        with tqdm(total=n, desc="olmocr-bench", unit="page", disable=None) as bar:
            pages = olmocr.convert_pages(tests, data, backend, out, args.max_tokens or 2048, bar.update)
    summary = olmocr.score(tests, pages)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w") as f:
        for r in summary["results"]:
            f.write(json.dumps(r) + "\n")
    (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=1))
    missing = sum(md is None for md in pages.values())
    print(olmocr.table(summary))
    print(f"\n{len(tests)} tests on {len(pages)} pages ({missing} missing); results in {out}/")


def cmd_eval_score(args):
    from nanovl.eval.score import score_file

    if args.task == "olmocr-bench":
        return olmocr_bench(args, pages_from=args.predictions)
    summary = score_file(args.task, args.predictions)
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{summary['task']}: {summary['n']} items")
    for key, value in summary.items():
        if key not in ("task", "n"):
            print(f"  {key}: {value:.2f}" if isinstance(value, float) else f"  {key}: {value}")


def cmd_eval(args):
    from nanovl.eval.datasets import load
    from nanovl.eval.runner import EndpointBackend, LocalBackend, headline, run

    if args.task == "olmocr-bench":
        return olmocr_bench(args)
    if args.model and args.endpoint:
        raise NanovlError("give one of --model and --endpoint, not both")
    if not args.model and not args.endpoint:
        raise NanovlError("give --model (a checkpoint folder or a hub id, e.g. nvidia/Llama-3.1-Nemotron-Nano-VL-8B-V1)"
                          " or --endpoint URL; `nanovl eval run -h` for more")  # fmt: skip
    data = args.data
    if data is None and args.task == "corpus":
        data = str(Path.cwd().parent / "shared" / "corpus")
    if data is None:
        raise NanovlError("--data PATH is required: the benchmark's files, as distributed")
    items = load(args.task, data, args.images)
    if args.limit:
        items = items[: args.limit]
    backend = LocalBackend(args.model, args.max_tiles) if args.model else EndpointBackend(args.endpoint, args.api_key)
    reference = json.loads(open(args.reference).read()) if args.reference else None
    out = args.out or f"eval-{args.task}"
    s = run(args.task, items, backend, out, args.concurrency, args.max_tokens or 32, reference)
    print(f"{args.task}: {headline(s):.2f} / 100 over {s['n']} items ({s['failed']} failed, retried on rerun); "
          f"results in {out}/")  # fmt: skip


def add_eval_commands(sub, model_help: str):
    p = sub.add_parser(
        "eval",
        help="run a benchmark (nanovl eval TASK ...), or score predictions made elsewhere",
        usage="nanovl eval [run] TASK (--model MODEL | --endpoint URL) [options]\n"
        "       nanovl eval score TASK --predictions FILE [--json]",
        description="`nanovl eval TASK ...` is `nanovl eval run TASK ...`; `nanovl eval run -h` lists its options.",
    )
    esub = p.add_subparsers(dest="eval_command", required=True, prog="nanovl eval")
    e = esub.add_parser("run", help="evaluate --model or --endpoint URL on TASK (the default: `nanovl eval TASK`)")
    e.add_argument(
        "task", help="docvqa | infovqa | chartqa | ocrbench | textvqa | corpus | synthdocs (.jsonl --data) | "
        "olmocr-bench (--data: its *.jsonl and PDFs)",
    )  # fmt: skip
    e.add_argument("--data", help="the benchmark's files (default for corpus: ../shared/corpus)")
    e.add_argument("--images", help="image folder when it is not beside the annotations")
    e.add_argument("--model", help=model_help)
    e.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    e.add_argument("--api-key")
    e.add_argument("--concurrency", type=int, default=1, help="requests in flight (endpoints)")
    e.add_argument("--max-tokens", type=int, help="answer length (default 32; olmocr-bench pages 2048)")
    e.add_argument("--max-tiles", type=int)
    e.add_argument("--limit", type=int, help="only the first N items")
    e.add_argument("--out", help="output folder (default eval-TASK); rerunning resumes")
    e.add_argument("--reference", help="JSON {task: published score} drawn beside the result")
    e.set_defaults(func=cmd_eval)
    e = esub.add_parser("score", help="score a JSONL of predictions with the official metric of TASK")
    e.add_argument(
        "task",
        help="docvqa | infovqa | chartqa | ocrbench | textvqa | ai2d | mmmu | videomme | corpus | synthdocs "
        "| olmocr-bench",
    )
    e.add_argument("--predictions", required=True, help="JSONL: the task's gold fields and `prediction` "
                   "(olmocr-bench: a folder of PDF_pgN_repeat1.md pages)")  # fmt: skip
    e.add_argument("--data", help="olmocr-bench: the test files (*.jsonl) and PDFs")
    e.add_argument("--out", help="olmocr-bench: where results.jsonl and summary.json go")
    e.add_argument("--json", action="store_true", help="print the summary as JSON")
    e.set_defaults(func=cmd_eval_score)
