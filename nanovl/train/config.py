"""One training stage as a small config file (TOML or JSON) -> `TrainConfig`.

  stage = "vision" | "readout" | "projector" | "pretrain" | "sft"
    vision:    only the vision encoder trains, on per-patch character targets of synthetic pages
               (data = ["synthdocs"]; nanovl/train/vision.py);
    readout:   mlp1 and the LLM (and, with train_vision, the encoder) learn to transcribe single tiles
               of synthetic pages (data = ["synthdocs"]; nanovl/train/readout.py);
    projector: only mlp1 trains (vision encoder and LLM frozen), on image-text pairs;
    pretrain:  mlp1 and the LLM train, on interleaved image-text data;
    sft:       mlp1 and the LLM train on instructions, with `text_share` of text-only samples.
  model = a checkpoint folder (any supported family, or the previous stage's OUT/model)
  out = where checkpoints, metrics.jsonl, loss.png and the final OUT/model go

Unknown fields and bad values are errors naming the file and the field. Paths in the file are
relative to the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nanovl.errors import DataError

STAGES = ("vision", "readout", "projector", "pretrain", "sft")
SYNTH_STAGES = ("vision", "readout")  # stages that render their pages on the fly
SYNTHDOCS = "synthdocs"  # stage vision's data: pages rendered on the fly by the generator
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    projector: bool = False  # adapters on mlp1's Linear layers too


@dataclass
class TrainConfig:
    stage: str
    model: str
    out: str
    data: list[str]
    steps: int
    text_data: list[str] = field(default_factory=list)
    text_share: float = 0.0  # sft: fraction of each epoch's samples drawn from text_data
    batch_size: int = 8  # samples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (per process)
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    decay_fraction: float = 1.0  # the cosine spans this last part of the steps after warm-up; flat at lr before
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    clip: float = 1.0  # max gradient norm; 0 = no clipping
    seq_len: int = 2048  # tokens per packed row; a longer sample is an error (or a skip)
    max_tiles: int | None = None  # per-image tile budget; None = the checkpoint's
    sample_tiles: int | None = None  # tiles for all images of one sample together; None = no limit
    pack: bool = True
    bf16: bool | str = "auto"  # autocast to bfloat16 (weights stay float32); auto: on GPUs and AMX CPUs
    train_vision: bool = False  # also unfreeze the vision encoder (readout / pretrain / sft)
    vision_lr_scale: float = 1.0  # the encoder's lr is lr * vision_lr_scale where it trains
    lines_steps: int = 0  # readout: the first steps transcribe single text lines, then whole tiles
    block: list[int] = field(default_factory=lambda: [1, 1])  # readout: (columns, rows) of grid tiles a sample
    random_text: float = 0.0  # readout: share of each step's samples that are tiles of random strings
    char_loss: float = 0.0  # readout: weight of stage vision's per-patch character loss, kept as an auxiliary
    embed_loss: float = 0.0  # readout: weight of the loss pulling image tokens toward their characters' embeddings
    char_head: str | None = None  # readout: a stage-vision out folder whose character head char_loss starts from
    lora: LoraConfig | None = None
    save_every: int = 100
    keep: int = 2  # checkpoints kept
    seed: int = 0
    skip_bad: bool = False  # skip (and count) bad records instead of stopping
    device: str = "auto"  # auto: cuda when available (NCCL under torchrun), else cpu (gloo)
    threads: int | None = None

    def samples_per_step(self, world: int) -> int:
        return self.batch_size * self.grad_accum * world


def _line(text: str, key: str) -> str:
    """ ":N" for the line that sets `key` (TOML `key =` or JSON `"key":`), "" when not found."""
    k = re.escape(key)
    m = re.search(rf'^[ \t]*{k}[ \t]*=|"{k}"\s*:', text, re.M)
    return f":{text.count(chr(10), 0, m.start()) + 1}" if m else ""


def _check(cfg: TrainConfig, path: Path, text: str):
    def bad(name, why):
        raise DataError(f"{path}{_line(text, name.split('.')[0])}: field {name!r} {why}")

    if cfg.stage not in STAGES:
        bad("stage", f"must be one of {', '.join(STAGES)}, not {cfg.stage!r}")
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "save_every", "keep"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            bad(name, "must be a positive integer")
    if not isinstance(cfg.data, list) or not cfg.data:
        bad("data", "must be a non-empty list of JSONL files or tar shards")
    if (cfg.stage in SYNTH_STAGES) != (cfg.data == [SYNTHDOCS]):
        bad("data", f'must be ["{SYNTHDOCS}"] for stages vision and readout (they need where each character is '
                    f'drawn, which only the generator knows), and only for them')  # fmt: skip
    if cfg.stage == "vision" and (cfg.lora or cfg.text_data or cfg.train_vision):
        bad("stage", "vision trains the vision encoder alone: no lora, text_data or train_vision")
    if cfg.stage == "readout" and (cfg.lora or cfg.text_data):
        bad("stage", "readout trains on rendered tiles alone: no lora or text_data")
    readout_only = dict(lines_steps=0, char_loss=0.0, embed_loss=0.0, char_head=None, block=[1, 1], random_text=0.0)
    for name, default in readout_only.items():
        if cfg.stage != "readout" and getattr(cfg, name) != default:
            bad(name, "is a field of stage readout")
    block = cfg.block
    if not isinstance(block, list) or len(block) != 2 or not all(isinstance(v, int) and v >= 1 for v in block):
        bad("block", "must be [columns, rows] of grid tiles, each >= 1")
    if not 0 <= cfg.random_text <= 1:
        bad("random_text", "must be in [0, 1]")
    if not isinstance(cfg.lines_steps, int) or cfg.lines_steps < 0:
        bad("lines_steps", "must be a non-negative integer")
    for name in ("char_loss", "embed_loss"):
        if getattr(cfg, name) < 0:
            bad(name, "must be >= 0")
    if cfg.vision_lr_scale <= 0:
        bad("vision_lr_scale", "must be > 0")
    if cfg.char_loss and not cfg.train_vision:
        bad("char_loss", "trains the encoder: it needs train_vision = true")
    if not 0 <= cfg.text_share < 1:
        bad("text_share", "must be in [0, 1)")
    if cfg.text_share and not cfg.text_data:
        bad("text_data", "is needed when text_share > 0")
    if cfg.lr <= 0 or not 0 <= cfg.min_lr_ratio <= 1:
        bad("lr", "must be > 0 with min_lr_ratio in [0, 1]")
    if not 0 < cfg.decay_fraction <= 1:
        bad("decay_fraction", "must be in (0, 1]: the last part of the run over which the lr decays")
    if cfg.stage == "projector" and (cfg.train_vision or cfg.lora):
        bad("stage", "projector trains mlp1 alone: no train_vision or lora")
    if cfg.lora is not None:
        unknown = set(cfg.lora.targets) - set(LORA_TARGETS)
        if unknown:
            bad("lora.targets", f"has unknown projections {sorted(unknown)}; choose from {', '.join(LORA_TARGETS)}")
    if cfg.bf16 not in (True, False, "auto"):
        bad("bf16", 'must be true, false or "auto"')
    if cfg.device not in ("auto", "cpu", "cuda"):
        bad("device", "must be auto, cpu or cuda")


def _fields(cls, raw: dict, path: Path, text: str, prefix: str = "") -> dict:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        where = f"{path}{_line(text, unknown[0])}"
        raise DataError(f"{where}: unknown field {prefix}{unknown[0]!r} (known: {', '.join(sorted(known))})")
    return raw


def load_train_config(path: str | Path, **overrides) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: config file not found")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = None
    if path.suffix == ".toml" and tomllib is None:
        raise DataError(f"{path}: TOML configs need Python 3.11 or later; write the config as JSON")
    try:
        text = path.read_text()
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, json.JSONDecodeError) as e:  # TOMLDecodeError is a ValueError
        raise DataError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({e})") from None
    raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a table of fields")
    _fields(TrainConfig, raw, path, text)
    fields = dataclasses.fields(TrainConfig)
    required = [f.name for f in fields if f.default is f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise DataError(f"{path}: missing field {missing[0]!r}")
    if isinstance(raw.get("lora"), dict):
        raw["lora"] = LoraConfig(**_fields(LoraConfig, raw["lora"], path, text, "lora."))
    root = path.parent
    for key in ("model", "out", "char_head"):
        if raw.get(key) is None and key == "char_head":  # optional
            continue
        if not isinstance(raw[key], str):
            raise DataError(f"{path}: field {key!r} must be a path")
        raw[key] = os.path.normpath(root / raw[key])
    for key in ("data", "text_data"):
        if isinstance(raw.get(key), list):
            raw[key] = [p if p == SYNTHDOCS else os.path.normpath(root / p) for p in raw[key]]
    cfg = TrainConfig(**raw)
    _check(cfg, path, text)
    return cfg


def config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
