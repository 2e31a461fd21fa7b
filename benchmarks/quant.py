"""Quantized decoding: resident memory and decode tokens/s of the ~1B Llama-shaped model in bf16, int8,
FP8 and AWQ int4, in one run.

    python benchmarks/quant.py [--workdir /tmp/nanovl-bench]

The quantized checkpoints are written from the bf16 one by `nanovl quantize` (AWQ with a coarse
10-point search on 16 calibration lines, to keep the run short); `+emb` is `--int8-embeddings`
(the tied 128K-row embedding and lm_head as one int8 matrix instead of bf16 plus a packed copy).
Each variant runs in a fresh process: load (as every inference load does: bf16 prepacked, AWQ onto
PyTorch's CPU int4 kernel), one forward, then 32 greedy decode steps at batch 1; RSS is the
process's resident memory after loading over its baseline after imports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
from nanovl.checkpoint import load_text_model
from nanovl.engine import SamplingParams, TokenGenerator
base = rss()
model, _ = load_text_model(sys.argv[1], dtype="bfloat16", pack=True)
gen = TokenGenerator(model, [[1] * 16], SamplingParams(max_new_tokens=33, ignore_eos=True))
it = iter(gen)
next(it)
t0 = time.perf_counter()
n = sum(1 for _ in it)
print(json.dumps({"rss": rss() - base, "tok_s": n / (time.perf_counter() - t0)}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/nanovl-bench")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from decode import ensure_checkpoint

    from nanovl.quant.write import quantize_awq, quantize_fp8, quantize_int8

    work = Path(args.workdir)
    base = ensure_checkpoint(work)
    variants = {"bf16": base}
    runs = [("int8", quantize_int8, False), ("int8+emb", quantize_int8, True), ("fp8", quantize_fp8, False),
            ("awq-int4", quantize_awq, False), ("awq+emb", quantize_awq, True)]  # fmt: skip
    for name, fn, emb in runs:
        out = work / f"llama-1b-{name.replace('+', '-')}"
        if not (out / "model.safetensors").is_file():
            print(f"quantizing {name} ...", flush=True)
            kw = {"grid": 10, "samples": 16} if fn is quantize_awq else {}
            fn(str(base), str(out), int8_embeddings=emb, **kw)
        variants[name] = out
    print(f"\n{'format':>9} {'RSS GB':>7} {'x bf16':>7} {'decode tok/s':>13} {'x bf16':>7} {'ppl change':>11}")
    ref = None
    for name, path in variants.items():
        r = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])  # fmt: skip
        ref = ref or r
        rep = path / "quant_report.json"
        ppl = f"{json.loads(rep.read_text())['perplexity_change_percent']:+.2f}%" if rep.is_file() else "-"
        print(f"{name:>9} {r['rss'] / 1e9:>7.2f} {r['rss'] / ref['rss']:>7.2f} {r['tok_s']:>13.2f} "
              f"{r['tok_s'] / ref['tok_s']:>7.2f} {ppl:>11}")  # fmt: skip


if __name__ == "__main__":
    main()
