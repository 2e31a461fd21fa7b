"""Peak memory of loading: nanovl (plain and packed) and transformers on the same ~1B bf16 checkpoint.

    python benchmarks/load_memory.py [--workdir /tmp/nanovl-bench]

Each loader runs in a fresh process, loads the weights, runs one forward pass (so every weight page is
touched) and reports its peak RSS (VmHWM) above the process's RSS after imports, against the weight
bytes. RSS counts anonymous memory and the mapped file pages of a zero-copy load alike; both are shown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
def mem():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            d[k] = int(v.split()[0]) * 1024
    return d
mode, path = sys.argv[1], sys.argv[2]
if mode == "transformers":
    from transformers import AutoModelForCausalLM
else:
    from nanovl.checkpoint import load_text_model
base = mem()
t0 = time.perf_counter()
if mode == "transformers":
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    run = lambda ids: model(ids).logits
else:
    model, _ = load_text_model(path, dtype="bfloat16", pack=(mode == "nanovl-packed"))
    run = model
load_s = time.perf_counter() - t0
with torch.inference_mode():
    run(torch.zeros(1, 8, dtype=torch.long))
print(json.dumps({"base": base, "after": mem(), "load_s": load_s}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/nanovl-bench")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from decode import ensure_checkpoint, weight_bytes_per_step

    path = ensure_checkpoint(Path(args.workdir))
    wbytes = weight_bytes_per_step(path)
    print(f"checkpoint: {path} ({wbytes / 1e9:.2f} GB of bf16 weights)\n")
    head = f"{'loader':>14} {'load s':>7} {'peak RSS over base':>19} {'x weights':>10}"
    print(head + f" {'anon after':>11} {'file after':>11}")
    for mode in ("nanovl", "nanovl-packed", "transformers"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True)
        if out.returncode:
            print(f"{mode}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        peak = r["after"]["VmHWM"] - r["base"]["VmRSS"]
        anon = r["after"]["RssAnon"] - r["base"]["RssAnon"]
        file = r["after"]["RssFile"] - r["base"]["RssFile"]
        print(
            f"{mode:>14} {r['load_s']:>7.2f} {peak / 1e9:>16.2f} GB {peak / wbytes:>10.2f} "
            f"{anon / 1e9:>8.2f} GB {file / 1e9:>8.2f} GB"
        )


if __name__ == "__main__":
    main()
