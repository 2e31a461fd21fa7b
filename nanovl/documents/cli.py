"""The document commands of `nanovl`: extract, extract calibrate, convert, batch and mcp (parsers and
thin handlers; the work is in nanovl/documents/ and nanovl/serve/mcp.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from nanovl.documents.connect import open_backend
from nanovl.errors import NanovlError
from nanovl.hub import resolve_model


def add_backend_args(p, model_help: str):
    """--model or --endpoint (with its key), and the local model's dtype."""
    p.add_argument("--model", help="vision-language " + model_help)
    p.add_argument("--endpoint", help="or an OpenAI-compatible server's base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", help="the endpoint's API key")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float32")


def cmd_extract(args):
    from nanovl.documents.extract import extract, fields_schema, find_calibration, load_extract_schema

    if bool(args.schema) == bool(args.fields):
        raise NanovlError("give the fields to extract: --schema S.json or --fields total,date,vendor (one of them)")
    schema = load_extract_schema(args.schema) if args.schema else fields_schema(args.fields)
    calibration = find_calibration(None, args.calibration) if args.calibration else None
    backend = open_backend(args.model, args.endpoint, args.api_key, args.dtype)
    out = open(args.out, "a") if args.out else sys.stdout
    failed = 0
    try:
        for doc in args.documents:
            try:
                result = extract(backend, doc, schema, args.pages, args.dpi, args.max_tiles, args.max_tokens,
                                 calibration)  # fmt: skip
                record = {"document": doc, **result}
            except NanovlError as e:  # one bad document does not stop the others
                failed += 1
                record = {"document": doc, "error": str(e)}
                print(f"nanovl: {e}" if doc in str(e) else f"nanovl: {doc}: {e}", file=sys.stderr)
            pretty = out is sys.stdout and len(args.documents) == 1 and sys.stdout.isatty()
            out.write(json.dumps(record, ensure_ascii=False, indent=2 if pretty else None) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    if failed:
        raise NanovlError(f"{failed} of {len(args.documents)} document(s) failed (error records written)")


def convert_one(backend, doc: str, target: Path | None, args) -> bool:
    """One document into `target` (None: stdout), written to TARGET.partial and renamed when done; a
    document that fails keeps the pages it finished in the .partial file. True when it succeeded."""
    from tqdm import tqdm

    from nanovl.documents.convert import Writer, convert_pages

    partial = target.with_name(target.name + ".partial") if target else None
    out, done = (open(partial, "w") if partial else sys.stdout), 0
    try:
        writer = Writer(out, args.to, doc)
        with tqdm(desc=Path(doc).name, unit="page", disable=None, file=sys.stderr) as bar:
            for page in convert_pages(backend, doc, args.pages, args.dpi, args.max_tokens, max_tiles=args.max_tiles):
                writer.page(page)
                done += 1
                bar.update()
        writer.close()
    except NanovlError as e:  # a document that cannot be read: say so; the others go on
        kept = f" (its first {done} page(s) are in {partial})" if partial and done else ""
        print((f"nanovl: {e}" if doc in str(e) else f"nanovl: {doc}: {e}") + kept, file=sys.stderr)
        if partial and not done:
            out.close()
            partial.unlink()
        return False
    finally:
        if partial:
            out.close()
    if partial:
        os.replace(partial, target)
        print(f"wrote {target}", file=sys.stderr)
    return True


def cmd_extract_calibrate(args):
    from tqdm import tqdm

    from nanovl.documents.calibrate import calibrate, measure
    from nanovl.documents.extract import CALIBRATION_FILE

    if not args.out and not args.model:
        raise NanovlError("with --endpoint, say where the calibration goes: --out FILE")
    out = Path(args.out) if args.out else resolve_model(args.model) / CALIBRATION_FILE
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    data = Path(args.data)
    backend = open_backend(args.model, args.endpoint, args.api_key, args.dtype)
    with tqdm(desc="extract calibrate", unit="doc", disable=None, file=sys.stderr) as bar:
        rows = measure(backend, data, args.limit, bar.update)
    s = calibrate(rows, out, plot, str(data))
    m = s["measured"]
    print(f"fitted on {s['fit']['values']} values of {s['fit']['documents']} documents; measured on {m['values']} "
          f"values of {m['documents']} others: accuracy {m['accuracy']:.3f}, expected calibration error "
          f"{m['ece_before']:.3f} raw -> {m['ece_after']:.3f} calibrated")  # fmt: skip
    print(f"wrote {out} and {plot}", file=sys.stderr)


def cmd_convert(args):
    from nanovl.documents.convert import FORMATS, SUFFIX

    if args.to not in FORMATS:
        raise NanovlError(f"--to must be one of {', '.join(FORMATS)}")
    several = len(args.documents) > 1
    out_dir = Path(args.out) if args.out and (several or Path(args.out).is_dir()) else None
    if several and not args.out:
        raise NanovlError("converting several documents needs --out DIR (one file per document there)")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    backend = open_backend(args.model, args.endpoint, args.api_key, args.dtype)
    failed, used = 0, set()
    for doc in args.documents:
        if out_dir is not None:
            stem = Path(doc).stem
            while stem in used:  # two documents of one name from different folders
                stem += "_"
            used.add(stem)
            target = out_dir / (stem + SUFFIX[args.to])
        else:
            target = Path(args.out) if args.out else None
        failed += not convert_one(backend, doc, target, args)
    if failed:
        raise NanovlError(f"{failed} of {len(args.documents)} document(s) failed")


def cmd_batch(args):
    from tqdm import tqdm

    from nanovl.documents import batch

    out = Path(args.out)
    paths = batch.expand_inputs(args.inputs)
    if not paths:
        raise NanovlError("no documents found in the inputs")
    common = dict(pages=args.pages, dpi=args.dpi, max_tiles=args.max_tiles, max_tokens=args.max_tokens)
    if args.task == "extract":
        from nanovl.documents.extract import fields_schema, find_calibration, load_extract_schema

        if bool(args.schema) == bool(args.fields):
            raise NanovlError("--task extract needs --schema S.json or --fields a,b (one of them)")
        schema = load_extract_schema(args.schema) if args.schema else fields_schema(args.fields)
        calibration = find_calibration(None, args.calibration) if args.calibration else None
    elif args.task == "ask" and not (args.question or "").strip():
        raise NanovlError("--task ask needs --question")
    jobs = batch.plan_jobs(paths)
    if args.retry_failed:
        print(f"{batch.drop_failed(out)} error record(s) removed from {out} to try again", file=sys.stderr)
    done = batch.done_hashes(out)
    todo = [j for j in jobs if j.sha256 is None or j.sha256 not in done]
    print(f"{len(paths)} file(s), {len(jobs)} document(s); {len(jobs) - len(todo)} already in {out}, "
          f"{len(todo)} to do", file=sys.stderr)  # fmt: skip
    if not todo:
        return
    if args.workers < 1 or (args.workers > 1 and args.endpoint):
        raise NanovlError("--workers N (N >= 1) is for a local --model; with --endpoint use --concurrency")
    if args.ray is not None and args.endpoint:
        raise NanovlError("--ray runs the model on the cluster: give --model DIR, not --endpoint")
    if args.workers > 1 or args.ray is not None:  # each worker loads its own copy; none is needed here
        if not args.model:
            raise NanovlError("--workers N and --ray need --model DIR")
        args.model, backend = str(resolve_model(args.model)), None
    else:
        backend = open_backend(args.model, args.endpoint, args.api_key, args.dtype)
    if args.task == "ask":
        task = batch.AskTask(backend, args.question, **common)
    elif args.task == "extract":
        task = batch.ExtractTask(backend, schema, calibration, **common)
    else:
        task = batch.ConvertTask(backend, args.to, **common)
    if args.concurrency is not None and args.concurrency > 1 and not args.endpoint:
        print("nanovl: a local model answers one request at a time; --concurrency is for --endpoint",
              file=sys.stderr)  # fmt: skip
    concurrency = (args.concurrency or 4) if args.endpoint else 1
    total = batch.count_pages(todo, task)
    with tqdm(total=total, unit="page", desc="nanovl batch", disable=None, file=sys.stderr) as bar:
        if args.ray is not None:
            address = None if args.ray == "local" else args.ray
            counts = batch.run_ray(todo, task, out, address, args.model, args.dtype, args.workers, bar.update)
        else:
            counts = batch.run_batch(todo, task, out, concurrency, bar.update, args.workers, args.model, args.dtype)
    print(f"{counts['done']} done, {counts['failed']} failed -> {out}", file=sys.stderr)
    if counts["failed"]:
        raise NanovlError(f"{counts['failed']} document(s) failed (their error records are in {out})")


def cmd_mcp(args):
    try:
        from nanovl.serve.mcp import serve_mcp
    except ImportError as e:
        raise NanovlError(f"`nanovl mcp` needs the MCP SDK: pip install mcp ({e})") from None
    serve_mcp(args.root, open_backend(args.model, args.endpoint, args.api_key, args.dtype), args.transport,
              args.host, args.port)  # fmt: skip


def add_document_commands(sub, model_help: str, add_document_args):
    p = sub.add_parser(
        "extract", help="extract fields from documents as JSON, each with its confidence and where it stands"
    )
    p.add_argument("documents", nargs="+", metavar="DOC", help="PDFs or images")
    p.add_argument("--schema", help="JSON schema of the fields (an object with properties)")
    p.add_argument("--fields", help="or field names separated by commas, each a string: total,date,vendor")
    p.add_argument("--calibration", help="a calibration file (default: extract_calibration.json beside the model)")
    p.add_argument("--out", help="append one JSON record per document to this file (default: stdout)")
    p.add_argument("--max-tokens", type=int, help="most tokens of the JSON answer (default: what the schema can need)")
    add_document_args(p)
    add_backend_args(p, model_help)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("extract-calibrate", help="(nanovl extract calibrate) fit extraction confidence, held-out data")
    p.add_argument("--data", required=True, help="a folder from `nanovl synth DIR --split eval --pdf` (its pdf.jsonl)")
    p.add_argument("--out", help=f"the calibration file (default: {'{MODEL}'}/extract_calibration.json, beside it)")
    p.add_argument("--plot", help="the reliability diagram (default: the calibration file with .png)")
    p.add_argument("--limit", type=int, help="use only the first N documents")
    add_backend_args(p, model_help)
    p.set_defaults(func=cmd_extract_calibrate)

    p = sub.add_parser("convert", help="convert documents to Markdown, HTML or JSON blocks, page by page")
    p.add_argument("documents", nargs="+", metavar="DOC", help="PDFs or images")
    p.add_argument("--to", default="markdown", help="markdown (default), html or json")
    p.add_argument("--out", help="output file, or a folder (one file per document; needed for several)")
    p.add_argument("--max-tokens", type=int, default=2048, help="most tokens per page (default 2048)")
    add_document_args(p)
    add_backend_args(p, model_help)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("batch", help="ask / extract / convert over many documents into one JSONL file (resumable)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders, glob patterns, lists (.txt, .lst)")
    p.add_argument("--task", required=True, choices=["ask", "extract", "convert"])
    p.add_argument("--out", required=True, help="results JSONL; documents already in it are skipped (by content)")
    p.add_argument("--question", help="ask: the question")
    p.add_argument("--schema", help="extract: JSON schema of the fields")
    p.add_argument("--fields", help="extract: or field names, e.g. total,date,vendor")
    p.add_argument("--calibration", help="extract: a calibration file")
    p.add_argument("--to", default="markdown", help="convert: markdown (default), html or json")
    p.add_argument("--concurrency", type=int, help="--endpoint: requests in flight (default 4)")
    p.add_argument("--workers", type=int, default=1, help="--model: processes, each with its own copy (default 1)")
    p.add_argument(
        "--ray", nargs="?", const="local", metavar="ADDRESS",
        help="run on a Ray cluster through Ray Data (--workers actors); no ADDRESS: a local cluster",
    )  # fmt: skip
    p.add_argument("--retry-failed", action="store_true", help="drop the output's error records and try those again")
    p.add_argument("--max-tokens", type=int, help="per answer (ask 256, extract: what its schema needs, convert 2048)")
    add_document_args(p)
    add_backend_args(p, model_help)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("mcp", help="serve the documents of a folder to agents over MCP (stdio or HTTP)")
    p.add_argument("--root", required=True, help="the folder whose documents the tools may read (nothing outside)")
    p.add_argument("--transport", default="stdio", choices=["stdio", "http"], help="stdio (default) or http")
    p.add_argument("--host", default="127.0.0.1", help="http: address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="http: port (default 8765); the endpoint is /mcp")
    add_backend_args(p, model_help)
    p.set_defaults(func=cmd_mcp)
