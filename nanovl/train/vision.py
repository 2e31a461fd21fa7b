"""`stage = "vision"`: teach the vision encoder to see characters before any language modelling.

Why a stage of its own: a small encoder trained from scratch on image-text pairs alone learned to
tell that a page is there, not what is written on it (the pilots in issue #7: the loss with a
sample's own page equalled the loss with another sample's page). A dense objective gives every patch
its own target, so the glyph detail has to be in the features.

- Data (`data = ["synthdocs"]`): synthetic pages from the generator, training seeds only, rendered on
  the fly, degraded by `nanovl.synth.degrade` and tiled by the checkpoint's own rule. The clean page knows
  every character it drew and where (`TextItem.chars`); the positions follow the rotation.
- Target: for each patch of each grid tile (the thumbnail is left out: its text is too small to
  label), the characters whose centres fall in it, in reading order (line, then x), in `SLOTS` slots
  over `CHARSET` (+ empty, + other). A linear head on the encoder's patch features; cross-entropy,
  empty slots weighted `EMPTY_WEIGHT`. Tiles without any character are skipped.
- Step s renders from `random.Random(f"vision:{seed}:{s}")`: a resumed run trains on the same pages.
- At every save: slot accuracy on the characters of held-out pages (evaluation seeds), in metrics.jsonl.
- OUT/model is the starting checkpoint with the trained encoder; the head stays in the checkpoints.
- What it feeds the shared loop (nanovl/train/loop.py: optimizer, lr schedule, clipping, metrics,
  checkpoints, SIGTERM, resumption): `VisionStage`, one process (the stage is small).
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from nanovl.errors import DataError
from nanovl.synth import EVAL_SEED_START, KINDS, Page, degrade, make_doc, rotate_points
from nanovl.tiling import TilePlan, TileSpec, make_tiles, plan_tiles
from nanovl.train.config import TrainConfig, config_dict
from nanovl.train.export import export_model
from nanovl.train.loop import Run, Stage

CHARSET = "".join(chr(c) for c in range(33, 127)) + "£€"  # printable ASCII but the space
CHAR_ID = {c: i + 1 for i, c in enumerate(CHARSET)}  # 0 = empty slot
OTHER = len(CHARSET) + 1  # a character outside CHARSET
CLASSES = len(CHARSET) + 2
SLOTS = 4  # characters per patch kept (a 16-px patch of ~11-px text holds 2-3)
EMPTY_WEIGHT = 0.2
EVAL_DOCS = 2  # held-out documents per kind


def page_chars(page: Page) -> list[tuple[float, float, str, int]]:
    """(x, y, character, line number) of every character drawn on the page."""
    return [(x, y, c, n) for n, line in enumerate(page.lines) for item in line.items for x, y, c in item.chars()]


def patch_targets(chars, plan: TilePlan, spec: TileSpec, size: tuple[int, int], patch: int) -> torch.Tensor:
    """Characters at page positions -> (grid tiles, patches per tile, SLOTS) class ids."""
    (cols, rows), t = plan.grid, spec.tile_size
    side = t // patch
    sx, sy = cols * t / size[0], rows * t / size[1]
    cells = defaultdict(list)
    for x, y, c, line in chars:
        x, y = x * sx, y * sy
        if 0 <= x < cols * t and 0 <= y < rows * t:
            tile = int(y // t) * cols + int(x // t)
            cells[tile, int(y % t // patch) * side + int(x % t // patch)].append((line, x, CHAR_ID.get(c, OTHER)))
    out = torch.zeros(cols * rows, side * side, SLOTS, dtype=torch.long)
    for (tile, cell), found in cells.items():
        for slot, (_, _, cid) in enumerate(sorted(found)[:SLOTS]):
            out[tile, cell, slot] = cid
    return out


def render_tiles(kind: str, seed: int, rng: random.Random, spec: TileSpec, patch: int, max_tiles: int | None,
                 strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One document -> (tiles, 3, S, S) pixels and their targets, tiles without characters left out."""
    pixels, targets = [], []
    for page in make_doc(kind, seed, augment_strength=0).clean:
        im, angle = degrade(page.image.copy(), rng, strength)
        chars = rotate_points(page_chars(page), angle, im.size)
        plan = plan_tiles(spec, *im.size, max_tiles)
        grid = plan.grid[0] * plan.grid[1]
        y = patch_targets(chars, plan, spec, im.size, patch)
        keep = (y > 0).flatten(1).any(1)
        pixels.append(make_tiles(im, spec, plan)[:grid][keep])
        targets.append(y[keep])
    return torch.cat(pixels), torch.cat(targets)


def step_batch(step: int, cfg: TrainConfig, spec: TileSpec, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiles of one optimizer step: deterministic in (seed, step); training seeds only."""
    rng = random.Random(f"vision:{cfg.seed}:{step}")
    pixels, targets, n = [], [], 0
    while n < cfg.batch_size:
        x, y = render_tiles(rng.choice(KINDS), rng.randrange(EVAL_SEED_START), rng, spec, patch, cfg.max_tiles)
        pixels.append(x)
        targets.append(y)
        n += len(x)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(rng.getrandbits(62)))[: cfg.batch_size]
    return torch.cat(pixels)[pick], torch.cat(targets)[pick]


def eval_set(spec: TileSpec, patch: int, max_tiles: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [render_tiles(k, EVAL_SEED_START + i, random.Random(f"vision-eval:{k}:{i}"), spec, patch, max_tiles)
             for k in KINDS for i in range(EVAL_DOCS)]  # fmt: skip
    return torch.cat([p for p, _ in pairs]), torch.cat([t for _, t in pairs])


def slot_loss(head: nn.Linear, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The weighted slot cross-entropy of a character head on patch features (tiles, patches, width)
    against (tiles, patches, SLOTS) class ids; empty slots weigh EMPTY_WEIGHT, -1 slots nothing."""
    logits = head(feats).unflatten(-1, (SLOTS, CLASSES))
    if logits.shape[:3] != targets.shape:
        raise DataError(f"the vision encoder gives {tuple(logits.shape[:2])} patch features per batch, "
                        f"the targets are for {tuple(targets.shape[:2])}")  # fmt: skip
    y = targets.flatten()
    w = torch.where(y > 0, 1.0, EMPTY_WEIGHT) * (y >= 0)  # -1: not labelled (a thumbnail), no loss
    loss = F.cross_entropy(logits.float().flatten(0, 2), y.clamp(min=0), reduction="none")
    return (loss * w).sum() / w.sum().clamp(min=1e-6)


class CharHead(nn.Module):
    """The vision encoder with a linear per-patch character head; forward gives the weighted loss."""

    def __init__(self, vision: nn.Module, width: int):
        super().__init__()
        self.vision = vision
        self.head = nn.Linear(width, SLOTS * CLASSES)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.vision(pixels)).unflatten(-1, (SLOTS, CLASSES))  # (tiles, patches, SLOTS, C)

    def forward(self, pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return slot_loss(self.head, self.vision(pixels), targets)

    @torch.no_grad()
    def char_accuracy(self, pixels: torch.Tensor, targets: torch.Tensor, batch: int = 32) -> float:
        right = total = 0
        for i in range(0, len(pixels), batch):
            pred, y = self.logits(pixels[i : i + batch]).argmax(-1), targets[i : i + batch]
            right += int((pred == y)[y > 0].sum())
            total += int((y > 0).sum())
        return right / max(total, 1)


class VisionStage(Stage):
    """One optimizer step of the vision stage: the step's rendered tiles, their character loss; the
    held-out character accuracy at every checkpoint."""

    def __init__(self, run: Run, model: CharHead, spec: TileSpec, patch: int, val: tuple[torch.Tensor, torch.Tensor]):
        self.run, self.model, self.spec, self.patch = run, model, spec, patch
        self.val_x, self.val_y = val  # (tiles, 3, S, S), (tiles, patches, SLOTS)

    def step(self, step: int) -> dict[str, float]:
        pixels, targets = step_batch(step, self.run.cfg, self.spec, self.patch)
        with self.run.autocast():
            part = self.model(pixels.to(self.run.device), targets.to(self.run.device))
        part.backward()
        return {"loss": part.item()}

    def report(self, totals: dict[str, float], dt: float) -> tuple[float, dict]:
        return totals["loss"], {"tiles_per_s": self.run.cfg.batch_size / dt}

    def at_save(self) -> dict:
        self.model.eval()
        accuracy = self.model.char_accuracy(self.val_x.to(self.run.device), self.val_y.to(self.run.device))
        self.model.train()
        return {"val_char_acc": accuracy}

    def postfix(self, row: dict) -> dict:
        return {"char_acc": f"{row['val_char_acc']:.3f}"} if "val_char_acc" in row else {}


def open_synth_stage(cfg: TrainConfig, restart: bool):
    """(Run, checkpoint config, VLM in float32 with nothing trainable) for a stage that renders its own
    pages (vision, readout): one process, a vision-language checkpoint."""
    from nanovl.checkpoint import load_config, load_vlm
    from nanovl.models import is_vlm

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DataError(f"stage {cfg.stage} runs in one process; start it without torchrun")
    run = Run(cfg, restart)
    ckpt = load_config(cfg.model)
    if not is_vlm(ckpt.architecture):
        raise DataError(f"{cfg.model}: stage {cfg.stage} needs a vision-language checkpoint, not {ckpt.architecture}")
    vlm, _ = load_vlm(cfg.model, dtype="float32")
    vlm.requires_grad_(False)
    return run, ckpt, vlm


def train_vision(cfg: TrainConfig, restart: bool = False) -> dict:
    """The vision stage (see the module docstring); resumable like every stage."""
    run, ckpt, vlm = open_synth_stage(cfg, restart)
    spec, patch, width = vlm.config.tiles, vlm.config.vision.patch_size, vlm.config.vision.hidden_size
    vlm.vision_model.requires_grad_(True)
    torch.manual_seed(cfg.seed)
    model = CharHead(vlm.vision_model, width)
    info = {"config": config_dict(cfg), "world": 1, "charset": CHARSET, "slots": SLOTS}
    opt, start = run.start(model, info)
    val = eval_set(spec, patch, cfg.max_tiles)
    n_train = sum(p.numel() for p in run.trainable)
    run.announce(start, f"{n_train:,} parameters trainable (encoder + character head), {cfg.batch_size} tiles of "
                 f"{spec.tile_size} px per step, held-out {len(val[0])} tiles, on {run.device}")  # fmt: skip
    step, loss = run.loop(VisionStage(run, model, spec, patch, val), model, opt, start, info)
    rows = [json.loads(ln) for ln in run.metrics.read_text().splitlines() if ln.strip()]
    accuracy = [r["val_char_acc"] for r in rows if "val_char_acc" in r]
    saved = export_model(vlm, ckpt, cfg.model, run.out / "model", vlm=True)
    return {"steps": step, "loss": loss, "val_char_acc": accuracy[-1] if accuracy else None, "out": str(run.out),
            "saved": str(saved), "plot": run.plot(), "already_done": start >= cfg.steps}  # fmt: skip
