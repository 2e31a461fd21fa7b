"""The `nanovl` command: argument parsing and dispatch; the work happens in the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from nanovl.errors import NanovlError
from nanovl.hub import MODEL_HINT, resolve_model


def add_document_args(p: argparse.ArgumentParser):
    from nanovl.media import DEFAULT_DPI

    p.add_argument("--pages", help="PDF pages, e.g. 1-3,7 (default: all)")
    p.add_argument("--dpi", type=float, default=DEFAULT_DPI, help=f"PDF render resolution (default {DEFAULT_DPI})")
    p.add_argument("--max-tiles", type=int, help="tile budget per image (default: the checkpoint's)")
    p.add_argument("--frames", type=int, help="video: this many frames, evenly spread (default 8)")
    p.add_argument("--fps", type=float, help="video: one frame every 1/FPS seconds (capped at 64 frames)")


def add_sampling_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json, else greedy)")
    g.add_argument("--max-tokens", type=int, default=256, help="most new tokens (default 256)")
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int, help="makes sampling repeatable")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not included in output")
    g.add_argument("--json-schema", metavar="FILE", help="answer with JSON valid against this JSON schema")
    g.add_argument("--json", action="store_true", help="answer with a JSON object")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float32")
    p.add_argument(
        "--show-reasoning", action="store_true", help="print a reasoning model's <think> block (dimmed on a terminal)"
    )
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")


def sampling_kwargs(args) -> dict:
    if getattr(args, "_sampling", None) is None:  # read once (a --json-schema file among them)
        args._sampling = _sampling_kwargs(args)
    return args._sampling


def _sampling_kwargs(args) -> dict:
    return dict(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or None,
        json_schema=load_schema_file(args.json_schema) if args.json_schema else (True if args.json else None),
    )


def load_schema_file(path: str) -> dict:
    from nanovl.engine.constrained import load_schema_file as load

    return load(path)


def check_sampling_args(args):
    """Validate what the user typed before spending time on loading the model."""
    from nanovl.engine import SamplingParams

    SamplingParams(**{k: v for k, v in sampling_kwargs(args).items() if v is not None})


def stream_to_stdout(model, ids: list[int], args) -> str:
    """Stream one completion to stdout; return its text."""
    from nanovl.engine import stream

    params = model.params(**sampling_kwargs(args))
    deltas = stream(model.model, model.tokenizer, [ids], params)
    return write_stream(deltas, len(ids), args, opens_thinking(model.tokenizer, ids))


def opens_thinking(tokenizer, ids: list[int]) -> bool:
    """Did the chat template open a <think> block at the end of the prompt?"""
    return tokenizer.decode(ids[-4:]).rstrip().endswith("<think>")


def add_vision_backend_args(p: argparse.ArgumentParser):
    p.add_argument("--vision-backend", default="torch", choices=["torch", "onnx"],
                   help="the vision path in PyTorch (default) or onnxruntime (`nanovl export onnx` first)")  # fmt: skip
    p.add_argument("--onnx", metavar="DIR", help="the exported graph's folder (default: MODEL/onnx)")


def add_reasoning_args(p: argparse.ArgumentParser):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--think", action="store_true", help="reasoning mode on (system prompt /think)")
    g.add_argument("--no-think", action="store_true", help="reasoning mode off (system prompt /no_think)")


def system_prompt(args) -> str | None:
    """--system, with /think or /no_think on its first line when asked for."""
    from nanovl.api import reasoning_system

    return reasoning_system(args.system, True if args.think else False if args.no_think else None)


def write_stream(deltas, prompt_tokens: int, args, thinking_at_start: bool = False) -> str:
    """Write text deltas to stdout as they come; a `<think>` block is dimmed on a terminal, hidden
    elsewhere unless --show-reasoning; speed on stderr with --stats; return the whole text."""
    from nanovl.engine.reasoning import ReasoningStream

    tty = sys.stdout.isatty()
    show = getattr(args, "show_reasoning", False) or tty
    splitter = ReasoningStream(thinking_at_start)
    t0, first, n, text, reason = time.perf_counter(), None, 0, [], ""

    def write(pieces):
        for kind, piece in pieces:
            if kind == "answer":
                sys.stdout.write(piece)
            elif show:
                sys.stdout.write(f"\x1b[2m{piece}\x1b[0m" if tty else piece)
        sys.stdout.flush()

    for d in deltas:
        first = first or time.perf_counter()
        n += 1
        text.append(d.text)
        reason = d.finish_reason or reason
        write(splitter.feed(d.text))
    write(splitter.finish())
    sys.stdout.write("\n")
    if args.stats and first:
        t1 = time.perf_counter()
        rate = (n - 1) / (t1 - first) if n > 1 else 0.0
        print(
            f"[{prompt_tokens} prompt tokens, {n} generated, first token {first - t0:.2f} s, "
            f"{rate:.1f} tokens/s, finish: {reason}]",
            file=sys.stderr,
        )
    return "".join(text)


def cmd_generate(args):
    import nanovl

    check_sampling_args(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = nanovl.load(args.model, args.dtype)
    stream_to_stdout(model, model.tokenizer.encode(prompt), args)


def cmd_chat(args):
    import nanovl

    check_sampling_args(args)
    model = nanovl.load(args.model, args.dtype)
    model.tokenizer.apply_chat_template([{"role": "user", "content": "x"}])  # fail early without a template
    system = [{"role": "system", "content": system_prompt(args)}] if system_prompt(args) else []
    history: list[dict] = []
    tty = sys.stdin.isatty()
    if tty:
        print("nanovl chat: /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            break
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": line})
        try:
            ids = model.tokenizer.encode_chat(system + history)
            reply = stream_to_stdout(model, ids, args)
        except NanovlError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            print(f"nanovl: error: {e}", file=sys.stderr)
            history.pop()
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
            print("\n[interrupted]", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def cmd_ask(args):
    import nanovl
    from nanovl.api import VisionLanguageModel
    from nanovl.engine import stream

    if len(args.inputs) < 2:
        raise NanovlError('give at least one file and then the question: nanovl ask --model DIR FILE "QUESTION"')
    *files, question = args.inputs
    check_sampling_args(args)
    model = nanovl.load(args.model, args.dtype)
    if not isinstance(model, VisionLanguageModel):
        raise NanovlError(f"{args.model} is a text-only model; `ask` needs a vision-language checkpoint")
    if args.vision_backend == "onnx":
        model.use_onnx_vision(args.onnx)
    images = model.scan_media(files, args.pages, args.dpi, frames=args.frames, fps=args.fps)  # rendered when encoded
    params = model.params(**sampling_kwargs(args))
    prompt = model.prepare(images, question, args.max_tiles, system_prompt(args), params.max_new_tokens)
    if args.stats:
        tiles = sum(p.tiles for p in prompt.plans)
        print(f"[{len(images)} input(s), {tiles} tiles, {len(prompt.ids)} prompt tokens]", file=sys.stderr)
    deltas = stream(model.model, model.tokenizer, [prompt.ids], params, embeds=[prompt.embeds])
    write_stream(deltas, len(prompt.ids), args, opens_thinking(model.tokenizer, prompt.ids))


def cmd_tiles(args):
    from nanovl.checkpoint import tile_spec
    from nanovl.media import load_document
    from nanovl.tiling import draw_grid, plan_tiles

    spec = tile_spec(resolve_model(args.model))
    pages = load_document(args.file, args.pages, args.dpi)
    plans = [plan_tiles(spec, *im.size, max_tiles=args.max_tiles) for im in pages]
    if args.json:
        print(json.dumps([p.as_dict() for p in plans]))
    else:
        print(f"{args.file}: {spec.rule} rule, {spec.tile_size}px tiles, {spec.min_tiles}-{spec.max_tiles} tiles")
        for i, (im, p) in enumerate(zip(pages, plans), 1):
            cols, rows = p.grid
            thumb = " + thumbnail" if p.thumbnail else ""
            grid = f"{cols}x{rows} grid{thumb}"
            print(f"  page {i}: {im.size[0]}x{im.size[1]} -> {grid} = {p.tiles} tiles, {p.image_tokens} image tokens")
    if args.out:
        out = Path(args.out)
        for i, (im, p) in enumerate(zip(pages, plans), 1):
            path = out if len(pages) == 1 else out.with_name(f"{out.stem}-page{i}{out.suffix}")
            draw_grid(im, p).save(path)
            print(f"wrote {path}", file=sys.stderr)


def cmd_serve(args):
    try:
        from nanovl.serve.app import serve
        from nanovl.serve.protocol import Limits
    except ImportError as e:
        raise NanovlError(
            f"the server needs FastAPI, uvicorn and sse-starlette: pip install 'nanovl[serve]' ({e})"
        ) from None
    serve(
        args.model, host=args.host, port=args.port, dtype=args.dtype, api_key=args.api_key,
        max_concurrency=args.max_concurrency, max_queue=args.max_queue, max_len=args.max_len,
        allowed_local_media_path=args.allowed_local_media_path, allow_remote_media=args.allow_remote_media,
        request_timeout=args.request_timeout, embed_store=args.embed_store, kv_cache_gb=args.kv_cache_gb,
        name=args.served_model_name, vision_backend=args.vision_backend, onnx=args.onnx, limits=Limits(
            max_body_bytes=int(args.max_body_mb * (1 << 20)), max_media=args.max_images, max_videos=args.max_videos,
            max_image_pixels=int(args.max_image_mp * 1e6), max_request_pixels=int(args.max_request_mp * 1e6),
            max_tiles=args.max_tiles_limit),
    )  # fmt: skip


def cmd_export(args):
    from nanovl.onnx_export import export

    meta = export(resolve_model(args.model), args.out, args.int8)
    print(f"wrote {args.out}/vision.onnx ({meta['architecture']}, {meta['tiles']['tile_size']}px tiles, "
          f"{meta['tiles']['tokens_per_tile']} tokens x {meta['hidden']} per tile) and vision.json")  # fmt: skip
    if "int8" in meta:
        e = meta["int8"]
        print(f"wrote {args.out}/vision.int8.onnx: embedding error against float32 on random tiles: max "
              f"{e['max_abs']:.3g}, mean {e['mean_abs']:.3g}, relative RMS {e['relative_rms']:.3g}")  # fmt: skip


def cmd_quantize(args):
    from nanovl.quant import METHODS
    from nanovl.quant.write import WRITERS, check_eval, score_change

    model = str(resolve_model(args.model))
    if args.eval:
        check_eval(model, args.eval)  # before the work, not after it
    fmt = METHODS[args.method]
    options = dict(calibration=args.calibration, samples=args.samples, include_vision=args.include_vision,
                   int8_embeddings=args.int8_embeddings)  # fmt: skip
    if fmt.group_size:
        options["group"] = args.group_size
    result = WRITERS[args.method](model, args.out, **options)
    print(f"wrote a {args.method} checkpoint to {args.out}")
    print(f"  held-out tokens {result['held_out_tokens']}: logit error mean {result['logit_abs_error_mean']:.4f}, "
          f"max {result['logit_abs_error_max']:.4f}; perplexity {result['perplexity_original']:.3f} -> "
          f"{result['perplexity_quantized']:.3f} ({result['perplexity_change_percent']:+.2f}%)")  # fmt: skip
    if "image_embedding_rel_error" in result:
        print(
            f"  held-out page tiles {result['held_out_tiles']}: image-embedding relative error "
            f"{result['image_embedding_rel_error']:.4f}"
        )
    if args.eval:
        change = score_change(model, args.out, args.eval, args.eval_max_tokens)
        print(f"  held-out synthdocs, {change['eval_items']} items, points (0-100): original -> quantized (change)")
        for name, m in change["eval"].items():
            print(f"    {name}: {m['original']:.2f} -> {m['quantized']:.2f} ({m['change']:+.2f})")


def cmd_make_tiny(args):
    from nanovl.tiny import ALL_FAMILIES, write_checkpoint

    if args.family not in ALL_FAMILIES:
        raise NanovlError(f"unknown family {args.family!r}; choose from {', '.join(ALL_FAMILIES)}")
    spec = {}
    if args.spec:
        try:
            spec = json.loads(Path(args.spec).read_text())
        except (OSError, ValueError) as e:
            raise NanovlError(f"{args.spec}: cannot read the model spec ({e})") from None
        unknown = set(spec) - set(SPEC_FIELDS)
        if unknown:
            raise NanovlError(f"{args.spec}: unknown field {sorted(unknown)[0]!r} (known: {', '.join(SPEC_FIELDS)})")
    corpus = None
    if spec.get("tokenizer_corpus"):
        from nanovl.synth import text_corpus

        corpus = text_corpus(int(spec["tokenizer_corpus"]))
    out = write_checkpoint(args.family, args.outdir, size=spec.get("size"), dtype=args.dtype, seed=args.seed,
                           vision=spec.get("vision"), image_size=spec.get("image_size"), corpus=corpus,
                           tokenizer_vocab=spec.get("tokenizer_vocab", 512), max_tiles=spec.get("max_tiles"),
                           top=spec.get("top"))  # fmt: skip
    print(f"wrote a {'' if args.spec else 'tiny '}random {args.family} checkpoint to {out}")


def tiny_families() -> list[str]:
    from nanovl.tiny import ALL_FAMILIES  # the registry's presets

    return ALL_FAMILIES


# make-tiny --spec: a JSON object with any of these (tokenizer_corpus: synthetic documents per kind)
SPEC_FIELDS = ("size", "vision", "image_size", "max_tiles", "top", "tokenizer_vocab", "tokenizer_corpus")


class Parser(argparse.ArgumentParser):
    """argparse, with where models come from when --model is missing."""

    def error(self, message: str):
        if message.startswith("the following arguments are required") and "--model" in message:
            message += "\n" + MODEL_HINT
        super().error(message)


MODEL_HELP = "checkpoint folder (Hugging Face layout) or Hugging Face hub id ORG/NAME"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nanovl", description="Nemotron Nano VL models, natively in PyTorch.")
    parser.add_argument("--version", action="version", version=f"nanovl {__import__('nanovl').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a raw prompt (no chat template), streaming to stdout")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="the text to continue; - reads it from stdin")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat with the checkpoint's chat template")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--system", help="system prompt")
    add_reasoning_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("ask", help="ask a question about images and PDFs, streaming the answer")
    p.add_argument("--model", required=True, help="vision-language " + MODEL_HELP)
    p.add_argument("inputs", nargs="+", metavar="FILE ... QUESTION", help="images / PDFs / videos, then the question")
    add_document_args(p)
    p.add_argument("--system", help="system prompt")
    add_reasoning_args(p)
    add_sampling_args(p)
    add_vision_backend_args(p)
    p.set_defaults(func=cmd_ask)

    from nanovl.documents.cli import add_document_commands

    add_document_commands(sub, MODEL_HELP, add_document_args)

    p = sub.add_parser("export", help="export the vision path (encoder, pixel shuffle, projector) as ONNX")
    p.add_argument("format", choices=["onnx"])
    p.add_argument("--model", required=True, help="vision-language " + MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder (vision.onnx, vision.json)")
    p.add_argument("--int8", action="store_true", help="also a dynamic int8 graph, with its embedding error")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("tiles", help="show how a document is cut into tiles for a model")
    p.add_argument("file", help="an image or a PDF")
    p.add_argument("--model", required=True, help="vision-language " + MODEL_HELP + " (only its configs are read)")
    add_document_args(p)
    p.add_argument(
        "--json", action="store_true", help='per page: {"grid": [columns, rows], "tiles", "thumbnail", "image_tokens"}'
    )
    p.add_argument("--out", help="write the page with the grid drawn over it (PNG); -pageN per page for PDFs")
    p.set_defaults(func=cmd_tiles)

    p = sub.add_parser("serve", help="serve an OpenAI-compatible API (/v1/chat/completions)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/")
    p.add_argument("--max-concurrency", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond that; more get 429")
    p.add_argument("--max-len", type=int, help="tokens per request slot (default: what --kv-cache-gb allows)")
    p.add_argument("--kv-cache-gb", type=float, default=4.0, help="KV cache for all slots (default 4 GiB)")
    p.add_argument("--request-timeout", type=float, help="seconds before a request is cut off")
    p.add_argument("--allowed-local-media-path", help="folder whose files requests may name as media")
    p.add_argument("--allow-remote-media", action="store_true", help="allow http(s) media URLs")
    p.add_argument("--embed-store", help="folder keeping image embeddings across requests and restarts")
    p.add_argument("--served-model-name", help="the model id clients use (default: the folder's name)")
    g = p.add_argument_group("per-request limits (checked before any page is rendered)")
    g.add_argument("--max-body-mb", type=float, default=64, help="request body size (default 64 MiB)")
    g.add_argument("--max-images", type=int, default=32, help="images + PDF pages + videos (default 32)")
    g.add_argument("--max-videos", type=int, default=2, help="videos (default 2)")
    g.add_argument("--max-image-mp", type=float, default=64, help="megapixels of one image or page (default 64)")
    g.add_argument("--max-request-mp", type=float, default=256, help="megapixels of all of them (default 256)")
    g.add_argument("--max-tiles-limit", type=int, default=48, help="the largest max_tiles a request may ask (48)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float32")
    add_vision_backend_args(p)
    p.set_defaults(func=cmd_serve)

    from nanovl.eval.cli import add_eval_commands

    add_eval_commands(sub, MODEL_HELP)

    from nanovl.quant import METHODS

    p = sub.add_parser("quantize", help="write a quantized checkpoint and report its accuracy cost")
    p.add_argument("--model", required=True, help=MODEL_HELP + " (language or vision-language model)")
    methods = ", ".join(f"{m} ({f.about})" for m, f in METHODS.items())
    p.add_argument("--method", required=True, choices=list(METHODS), help=methods)
    p.add_argument("--group-size", type=int, default=128, help="AWQ input columns per scale (default 128)")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--calibration", help="text file (one sample per line) or synthdocs (default: built-in sentences)")
    p.add_argument("--samples", type=int, default=64, help="calibration samples (default 64)")
    p.add_argument(
        "--include-vision",
        action="store_true",
        help="also quantize the vision tower (but its patch embedding) and the projector (fp8, int8)",
    )
    p.add_argument(
        "--int8-embeddings",
        action="store_true",
        help="also store the token embedding and lm_head as int8 rows (one matrix when tied); "
        "a nanovl extension other engines do not read",
    )
    p.add_argument(
        "--eval",
        metavar="FILE",
        help="held-out synthdocs file (eval.jsonl of `nanovl synth --split eval`): score the original and "
        "the quantized vision-language checkpoint on it and report the change",
    )
    p.add_argument("--eval-max-tokens", type=int, default=64, help="answer length for --eval (default 64)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the HF layout (tests, benchmarks)")
    p.add_argument("family", help=" | ".join(tiny_families()))
    p.add_argument("outdir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spec", help="JSON with the sizes, tiling and tokenizer to use (e.g. configs/tiny-doc/model.json)")
    p.set_defaults(func=cmd_make_tiny)

    from nanovl.train.cli import add_train_commands

    add_train_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["extract", "calibrate"]:  # `nanovl extract calibrate` is its own command
        argv = ["extract-calibrate", *argv[2:]]
    if len(argv) > 1 and argv[0] == "eval" and argv[1] not in ("run", "score", "-h", "--help"):
        argv.insert(1, "run")  # `nanovl eval TASK ...` is `nanovl eval run TASK ...`
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)  # the library's notes, on stderr
    try:
        args.func(args)
    except NanovlError as e:
        print(f"nanovl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `nanovl ask ... | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
