"""Training-step throughput: nanovl's trainer against a plain loop written the obvious way, same run.

Model: a small Llama_Nemotron_Nano_VL (make-tiny family with a 256-wide, 4-layer decoder and 128-px
tiles). Data: synthetic multi-turn document QA (nanovl synth). Both sides train the same parameters
(stage sft: mlp1 + LLM) on the same samples with AdamW, batch of 8 samples:
- reference: each batch right-padded to its longest sample, one forward/backward in float32;
- nanovl: `nanovl train` (packing into rows of seq_len tokens, bf16 autocast), and the same with
  bf16 off (this CPU has no AMX, so bf16 matmuls can be slower than float32 here).
Prints samples/s and real (non-pad) tokens/s of the timed steps (the first WARMUP are not timed).

  python benchmarks/train.py [--steps 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from nanovl.synth import write_dataset
from nanovl.tiny import write_checkpoint
from nanovl.train.config import load_train_config
from nanovl.train.data import collate, read_records
from nanovl.train.trainer import build_model, train

WARMUP = 2


def reference_loop(cfg, steps: int) -> tuple[float, float]:
    """The obvious loop: pad each batch, float32, mean token loss."""
    model, tok, encoder, tiles, _ = build_model(cfg)
    examples = [encoder.encode(r) for r in read_records(cfg.data)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    model.train()
    t0 = samples = tokens = 0
    for step in range(steps + WARMUP):
        if step == WARMUP:
            t0, samples, tokens = time.perf_counter(), 0, 0
        batch = [examples[(step * cfg.batch_size + i) % len(examples)] for i in range(cfg.batch_size)]
        b = collate(batch, tiles, cfg.seq_len, pack=False, pad_id=0)
        n = int((b.targets != -100).sum())
        loss = model(b.ids, b.targets, b.positions, None, b.pixels) / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        opt.zero_grad()
        samples += len(batch)
        tokens += b.tokens
    dt = time.perf_counter() - t0
    return samples / dt, tokens / dt


def nanovl_run(cfg_path: Path, steps: int, **over) -> tuple[float, float]:
    cfg = load_train_config(cfg_path)
    for k, v in over.items():
        setattr(cfg, k, v)
    cfg.steps = steps + WARMUP
    train(cfg, restart=True)
    rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()][WARMUP:]
    dt = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"] + rows[0]["tokens"] / rows[0]["tokens_per_s"]
    return sum(cfg.batch_size for _ in rows) / dt, sum(r["tokens"] for r in rows) / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="nanovl-bench-train-"))
    size = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096}  # fmt: skip
    write_checkpoint("nemotron-nano-vl-v1", root / "base", size=size, image_size=128, vocab_size=None)
    write_dataset(root / "data", 6, augment=0.5)
    cfg = {"stage": "sft", "model": str(root / "base"), "out": str(root / "run"), "data": [str(root / "data/qa.jsonl")],
           "steps": args.steps, "batch_size": 8, "lr": 1e-4, "max_tiles": 2, "seq_len": 2048, "save_every": 10_000,
           "threads": args.threads}  # fmt: skip
    path = root / "bench.json"
    path.write_text(json.dumps(cfg))
    ref = reference_loop(load_train_config(path), args.steps)
    bf16 = nanovl_run(path, args.steps, bf16=True)  # forced on: "auto" picks float32 on CPUs without AMX
    fp32 = nanovl_run(path, args.steps, bf16=False)
    print(f"train step, batch 8 samples, {args.steps} timed steps, {args.threads} threads")
    print(f"{'':28}{'samples/s':>12}{'tokens/s':>12}{'vs reference':>14}")
    print(f"{'reference (pad, fp32)':28}{ref[0]:12.2f}{ref[1]:12.0f}{1.0:13.2f}x")
    print(f"{'nanovl (pack, bf16 autocast)':28}{bf16[0]:12.2f}{bf16[1]:12.0f}{bf16[0] / ref[0]:13.2f}x")
    print(f"{'nanovl (pack, fp32)':28}{fp32[0]:12.2f}{fp32[1]:12.0f}{fp32[0] / ref[0]:13.2f}x")


if __name__ == "__main__":
    main()
