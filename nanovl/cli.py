"""The `nanovl` command: argument parsing and dispatch; the work happens in the library."""

from __future__ import annotations

import argparse
import sys
import time

from nanovl.errors import NanovlError


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
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float32")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")


def sampling_kwargs(args) -> dict:
    return dict(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or None,
    )


def check_sampling_args(args):
    """Validate what the user typed before spending time on loading the model."""
    from nanovl.engine import SamplingParams

    SamplingParams(**{k: v for k, v in sampling_kwargs(args).items() if v is not None})


def stream_to_stdout(model, ids: list[int], args) -> str:
    """Stream one completion to stdout; return its text."""
    from nanovl.engine import stream

    params = model.params(**sampling_kwargs(args))
    t0, first, n, text, reason = time.perf_counter(), None, 0, [], ""
    for d in stream(model.model, model.tokenizer, [ids], params):
        first = first or time.perf_counter()
        n += 1
        text.append(d.text)
        reason = d.finish_reason or reason
        sys.stdout.write(d.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats and first:
        t1 = time.perf_counter()
        rate = (n - 1) / (t1 - first) if n > 1 else 0.0
        print(
            f"[{len(ids)} prompt tokens, {n} generated, first token {first - t0:.2f} s, "
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
    system = [{"role": "system", "content": args.system}] if args.system else []
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


def cmd_make_tiny(args):
    from nanovl.tiny import FAMILIES, write_checkpoint

    if args.family not in FAMILIES:
        raise NanovlError(f"unknown family {args.family!r}; choose from {', '.join(FAMILIES)}")
    out = write_checkpoint(args.family, args.outdir, dtype=args.dtype, seed=args.seed)
    print(f"wrote a tiny random {args.family} checkpoint to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovl", description="Nemotron Nano VL models, natively in PyTorch.")
    parser.add_argument("--version", action="version", version=f"nanovl {__import__('nanovl').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a raw prompt (no chat template), streaming to stdout")
    p.add_argument("--model", required=True, help="checkpoint folder (Hugging Face layout)")
    p.add_argument("--prompt", required=True, help="the text to continue; - reads it from stdin")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat with the checkpoint's chat template")
    p.add_argument("--model", required=True, help="checkpoint folder (Hugging Face layout)")
    p.add_argument("--system", help="system prompt")
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the HF layout (tests, benchmarks)")
    p.add_argument("family", help="llama | qwen2")
    p.add_argument("outdir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except NanovlError as e:
        print(f"nanovl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
