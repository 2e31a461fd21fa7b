"""Decode speed: nanovl against transformers on the same ~1B Llama-shaped bf16 weights, and against the
memory-bandwidth limit (weight bytes read per token / measured copy bandwidth).

    python benchmarks/decode.py [--workdir /tmp/nanovl-bench] [--new-tokens 64] [--batches 1 8]
                                [--prefill-tokens 3400]

Prints one row per (engine, batch) and the ratios. Decode rate excludes the prefill: it is
(new tokens - 1) / (time of the whole generation - time to the first token). Then prefill: one
prompt of --prefill-tokens tokens (3,400 is about a 13-tile page of the 8B plus its question), timed
on each engine's second call, its FLOPs counted by torch's FlopCounterMode (causal attention as half
its square: benchmarks/vision.py's count_cpu_attention), as GFLOP/s against the bf16 matmul peak
measured in the same run (benchmarks/vision.py's). The CPU flags come first. nanovl's load sets glibc
to keep freed memory for reuse (quant/prepack.py, process-wide), and it loads first, so transformers'
rows run with that setting too; NANOVL_KEEP_HEAP=0 runs both without it.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Llama-3.2-1B's shape (tied embeddings, GQA 32/8, 128K vocab): 1.24 B parameters.
SIZE_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
)
VOCAB = 128256


def ensure_checkpoint(workdir: Path) -> Path:
    from nanovl.tiny import write_checkpoint

    path = workdir / "llama-1b-bf16"
    if not (path / "model.safetensors").is_file():
        print(f"writing a random 1B checkpoint to {path} ...", flush=True)
        write_checkpoint("llama", path, size=SIZE_1B, dtype="bfloat16", vocab_size=VOCAB)
    return path


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes moved (read + write) per second by a large tensor copy, best of `repeats`."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def weight_bytes_per_step(path: Path) -> int:
    """Every tensor in the checkpoint is read once per decode step: the matrices in full, and a tied
    lm_head reads the embedding matrix (stored once, counted once; the lookup's one row is ignored)."""
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) * 2 for k in f.keys())  # bf16: 2 bytes


def time_nanovl(model, prompts, n_new):
    from nanovl.engine import SamplingParams, TokenGenerator

    gen = TokenGenerator(model, prompts, SamplingParams(max_new_tokens=n_new))
    t0 = time.perf_counter()
    first = None
    steps = 0
    for _ in gen:
        steps += 1
        first = first or time.perf_counter()
    t1 = time.perf_counter()
    assert steps == n_new
    return first - t0, (n_new - 1) / (t1 - first)


def time_transformers(model, prompts, n_new):
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
        total = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + n_new
    return t_first, (n_new - 1) / (total - t_first)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/nanovl-bench")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-pack", action="store_true", help="plain F.linear instead of oneDNN-prepacked weights")
    ap.add_argument("--prefill-tokens", type=int, default=3400, help="prompt length of the prefill row (0: none)")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = ensure_checkpoint(Path(args.workdir))

    from nanovl.checkpoint import load_text_model

    ours, _ = load_text_model(path, dtype="bfloat16", pack=not args.no_pack)
    wbytes = weight_bytes_per_step(path)
    bw = copy_bandwidth()
    limit = bw / wbytes
    from vision import cpu_flags, forward_flops, matmul_peak  # benchmarks/vision.py, beside this script

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU flags: {' '.join(cpu_flags()) or 'none'}")
    print(f"weights: {wbytes / 2e9:.3f} B params, {wbytes / 1e9:.2f} GB bf16; packed linears: {not args.no_pack}")
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s -> bandwidth limit at batch 1: {limit:.2f} tokens/s\n")

    ref = None
    if not args.no_transformers:
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()

    # "of limit": decode steps/s against the bandwidth limit; one step reads the weights once for all rows
    head = f"{'batch':>5} {'engine':>12} {'prefill s':>10} {'steps/s':>8} {'tokens/s':>9} {'x transformers':>15}"
    print(head + f" {'of limit':>9}")
    for b in args.batches:
        g = torch.Generator().manual_seed(b)
        prompts = torch.randint(0, VOCAB, (b, args.prompt_tokens), generator=g).tolist()
        time_nanovl(ours, prompts, 4)  # warm-up
        p_ours, r_ours = time_nanovl(ours, prompts, args.new_tokens)
        r_ref = None
        if ref is not None:
            time_transformers(ref, prompts, 4)
            p_ref, r_ref = time_transformers(ref, prompts, args.new_tokens)
            row(b, "transformers", p_ref, r_ref, "1.00", limit)
        row(b, "nanovl", p_ours, r_ours, f"{r_ours / r_ref:.2f}" if r_ref else "-", limit)
    if args.prefill_tokens:
        prefill(ours, ref, args.prefill_tokens, matmul_peak(torch.bfloat16), forward_flops)


def prefill(ours, ref, n: int, peak: float, forward_flops):
    """One n-token prompt to its first token, nanovl (and transformers), as a fraction of the bf16 peak;
    the second of two calls each."""
    from nanovl.engine import SamplingParams, TokenGenerator

    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)).tolist()
    flops = forward_flops(lambda: ref(torch.tensor(ids))) if ref is not None else 0  # counted on transformers
    print(f"\nprefill of {n} tokens, batch 1; bf16 matmul peak here {peak:.0f} GFLOP/s; "
          f"{flops / 1e9:.0f} GFLOP (transformers' forward, counted)")  # fmt: skip
    print(f"{'engine':>12} {'seconds':>8} {'GFLOP/s':>8} {'of peak':>8} {'x transformers':>15}")

    def ours_first():
        next(iter(TokenGenerator(ours, ids, SamplingParams(max_new_tokens=1), context_len=n + 8)))

    def ref_first():
        with torch.inference_mode():
            ref.generate(torch.tensor(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)

    times = {}
    for name, fn in (("transformers", ref_first), ("nanovl", ours_first)):
        if name == "nanovl" or ref is not None:
            fn()  # warm-up: the first prompt of this length pays for kernel setup and heap growth
            t0 = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - t0
    for name, t in times.items():
        rate = flops / t / 1e9 if flops else float("nan")
        ratio = times.get("transformers", t) / t
        print(f"{name:>12} {t:>8.2f} {rate:>8.0f} {rate / peak:>8.0%} {ratio:>15.2f}")


def row(b, name, prefill, steps, ratio, limit):
    print(f"{b:>5} {name:>12} {prefill:>10.2f} {steps:>8.2f} {steps * b:>9.2f} {ratio:>15} {steps / limit:>9.0%}")


if __name__ == "__main__":
    main()
