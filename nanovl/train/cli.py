"""The training commands of `nanovl`: synth, train, merge-lora (parsers and thin handlers)."""

from __future__ import annotations

import argparse
import json


def cmd_synth(args):
    from nanovl.synth import KINDS, write_dataset
    from nanovl.train.data import write_shards

    kinds = args.kinds.split(",") if args.kinds else list(KINDS)
    counts = write_dataset(
        args.out,
        args.count,
        kinds,
        args.start,
        args.split,
        args.text,
        args.augment,
        args.workers,
        args.crops,
        args.copy,
        args.pdf,
    )
    for name, n in counts.items():
        print(f"{args.out}/{name}: {n} records")
    if args.shard_size:
        for name in counts:
            if name != "eval.jsonl":
                shards = write_shards(f"{args.out}/{name}", f"{args.out}/shards/{name[:-6]}", args.shard_size)
                print(f"{args.out}/shards/{name[:-6]}: {len(shards)} tar shard(s)")


def cmd_train(args):
    from nanovl.train.config import load_train_config
    from nanovl.train.trainer import train

    cfg = load_train_config(args.config, steps=args.steps, out=args.out)
    summary = train(cfg, restart=args.restart)
    if summary.get("saved"):
        acc = f", held-out character accuracy {summary['val_char_acc']:.3f}" if summary.get("val_char_acc") else ""
        if summary.get("val_cer") is not None:
            acc = f", held-out CER {summary['val_cer']:.3f} (single lines {summary['val_line_cer']:.3f})"
        loss = f"final loss {summary['loss']:.4f}{acc}"
        if summary.get("already_done"):  # its checkpoint is at the last step: nothing was trained
            print(f"nanovl train: already finished ({summary['steps']} steps, {loss}); saved {summary['saved']}; "
                  "raise --steps to go on, or --restart to train again")  # fmt: skip
        else:
            print(f"nanovl train: {summary['steps']} steps, {loss}; saved {summary['saved']}")
        if summary.get("plot"):
            print(f"nanovl train: loss curve {summary['plot']}")
    if args.json and summary.get("saved"):
        print(json.dumps(summary))


def cmd_merge_lora(args):
    from nanovl.train.export import merge_checkpoint

    out = merge_checkpoint(args.adapter, args.out, args.base)
    print(f"wrote the merged checkpoint to {out}")


def add_train_commands(sub: argparse._SubParsersAction):
    from nanovl.synth import TASKS

    p = sub.add_parser("synth", help="render synthetic documents with ground truth, as training conversations")
    p.add_argument("out", help="output folder: images/ and one JSONL per task (" + ", ".join(TASKS) + ")")
    p.add_argument("--count", type=int, default=100, help="documents per kind (default 100)")
    p.add_argument("--kinds", help="comma-separated: invoice,receipt,form,table,bar_chart,line_chart,report (all)")
    p.add_argument("--start", type=int, default=0, help="first seed (eval seeds are offset into a reserved range)")
    p.add_argument("--split", choices=["train", "eval"], default="train", help="eval also writes eval.jsonl")
    p.add_argument("--text", type=int, default=0, help="text-only instruction samples to write (text.jsonl)")
    p.add_argument("--copy", type=int, default=0, help="text-only copy tasks of random strings to write (copy.jsonl)")
    p.add_argument(
        "--pdf", action="store_true", help="also each document as a digital PDF with a text layer (pdf/, pdf.jsonl)"
    )
    p.add_argument("--augment", type=float, default=1.0, help="degradation strength, 0 = clean pages (default 1)")
    p.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
    p.add_argument(
        "--crops", type=int, default=0, help="also write this many crops per page with their text (crops.jsonl)"
    )
    p.add_argument("--shard-size", type=int, help="also write WebDataset-style tar shards of this many samples")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="run one training stage from a config file (resumes when run again)")
    p.add_argument("--config", required=True, help="TOML or JSON stage config (see docs/training.md)")
    p.add_argument("--steps", type=int, help="override the config's steps")
    p.add_argument("--out", help="override the config's output folder")
    p.add_argument("--restart", action="store_true", help="discard the output folder's checkpoints and start over")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base model (a new checkpoint folder)")
    p.add_argument("adapter", help="adapter folder (OUT/adapter of a LoRA run)")
    p.add_argument("out", help="output checkpoint folder")
    p.add_argument("--base", help="base model folder (default: the one recorded in adapter_config.json)")
    p.set_defaults(func=cmd_merge_lora)
