"""`stage = "readout"`: the projector and the language model learn to copy the text out of one tile.

Why a stage of its own (issue #16): with a perfect encoder, the decoder learning to transcribe whole
pages (~830 image tokens to search for the next glyph) learned far too slowly; on one grid-aligned
tile it searches 64, and a line is one left-to-right pass.

- Data (`data = ["synthdocs"]`): synthetic pages of the training seeds, rendered on the fly, degraded
  and tiled by the checkpoint's own rule, as in stage vision. Each grid tile with text is a sample:
  the tile as a one-tile image (what the processor makes of a 256-px image), the transcription
  question of the synthetic data (`TRANSCRIBE`), and as the answer the text whose characters have
  their centres in the tile, line by line (the parts of a line keep its separator).
- Single lines first: during the first `lines_steps` steps each sample keeps one line of its tile:
  the pixel rows outside that line's band are painted with the tile's median colour, and the answer
  is that line.
- Loss: the answer tokens' cross-entropy (mean over the step's answer tokens), plus
  - `char_loss` x stage vision's per-patch character loss on the encoder's features (its head taken
    from `char_head`, a stage-vision out folder), which keeps the encoder seeing characters while it
    trains at lr * vision_lr_scale (`train_vision = true`);
  - `embed_loss` x a cross-entropy pulling each image token (mlp1's output) toward the input
    embeddings of the characters in its patches: the logits are 16 x the cosine between the token
    and every vocabulary embedding, the target spreads evenly over the single-character tokens of
    the characters it shows (image tokens without characters are left out). The decoder's copy then
    starts as a lookup of embeddings it already reads.
- Step s renders from `random.Random(f"readout:{seed}:{s}")`: a resumed run trains on the same tiles.
- At every save: greedy transcription of held-out tiles (evaluation seeds; whole tiles and single
  lines), CER = Levenshtein edits over the gold characters, summed over the tiles, in metrics.jsonl
  (val_cer, val_line_cer).
- OUT/model: the checkpoint with what trained (mlp1, the LLM, the encoder with train_vision); the
  character head stays in the checkpoints. One process (`torchrun` is refused).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from torch import nn

from nanovl.engine.generate import TokenGenerator
from nanovl.engine.sampling import SamplingParams
from nanovl.errors import DataError
from nanovl.eval.metrics import cer
from nanovl.models.projector import pixel_shuffle
from nanovl.models.vlm import merge_embeddings
from nanovl.synth import EVAL_SEED_START, KINDS, Page, degrade, fonts_available, make_doc, rotate_points
from nanovl.synth.kinds import ink, new_page, random_string
from nanovl.synth.records import TRANSCRIBE
from nanovl.tiling import TilePlan, TileSpec, make_tiles, plan_tiles
from nanovl.train.config import TrainConfig, config_dict
from nanovl.train.data import IGNORE, Encoder, Record
from nanovl.train.export import export_model
from nanovl.train.loop import Checkpoints, Run, Stage
from nanovl.train.vision import CHARSET, CLASSES, SLOTS, open_synth_stage, page_chars, patch_targets, slot_loss

EVAL_DOCS = 2  # held-out documents per kind
EVAL_TILES = 48  # held-out tiles scored at each save, for whole tiles and for single lines
COSINE_SCALE = 16.0  # embed_loss logits: this times the cosine


@dataclass
class TileSample:
    pixels: torch.Tensor  # (tiles, 3, S, S): the sample's image as the processor tiles it
    chars: torch.Tensor  # (tiles, patches, SLOTS): stage vision's targets for the characters kept; -1 = none
    text: str
    plan: TilePlan


def page_glyphs(page: Page, angle: float, size: tuple[int, int], scale: tuple[float, float]) -> list[tuple]:
    """Per drawn line: (separator, its items as lists of (x, y, character, half height)), positions on
    the delivered page resized by `scale`."""
    sx, sy = scale
    return [(line.sep, [[(x * sx, y * sy, c, (item.bbox[3] - item.bbox[1]) / 2 * sy)
                         for x, y, c in rotate_points(item.glyphs(), angle, size)] for item in line.items])
            for line in page.lines]  # fmt: skip


def region_lines(glyphs: list[tuple], box: tuple[float, float, float, float]) -> list[tuple]:
    """The lines of region `box` (x0, y0, x1, y1) as (text, top, bottom, line number), top and bottom
    in the region's pixels: per drawn line, the characters whose centres fall inside, each item's part
    stripped, the parts joined by the line's separator."""
    x0, y0, x1, y1 = box
    out = []
    for n, (sep, items) in enumerate(glyphs):
        parts, top, bottom = [], float("inf"), float("-inf")
        for item in items:
            inside = [(y, c, h) for x, y, c, h in item if x0 <= x < x1 and y0 <= y < y1]
            text = "".join(c for _, c, _ in inside).strip()
            if text:
                parts.append(text)
                top = min([top] + [y - h for y, c, h in inside if not c.isspace()])
                bottom = max([bottom] + [y + h for y, c, h in inside if not c.isspace()])
        if parts:
            out.append((sep.join(parts), top - y0, bottom - y0, n))
    return out


def random_text_page(rng: random.Random, size: int, lines: int) -> Page:
    """A tile-sized page of `lines` lines of random strings, in the documents' fonts, sizes and inks."""
    f = fonts_available()
    page = new_page(rng, size, size)
    y = rng.randint(2, 40)
    for _ in range(lines):
        style = rng.choice(("regular", "regular", "bold", "mono"))
        face = (rng.choice(f[style]), rng.randint(11, 22))
        parts, x = [], rng.randint(2, 60)
        while not parts or rng.random() < 0.8:
            text = random_string(rng)
            width = page.text_width(text, face)
            if x + width > size - 4:
                break
            parts.append((x, text))
            x += width + rng.randint(12, 60)
        if not parts:
            continue
        bottom = page.write(parts, y, face, fill=ink(rng), sep=" ")
        y = bottom + rng.randint(3, 14)
        if y > size - 24:
            break
    return page


def page_samples(page: Page, rng: random.Random, spec: TileSpec, patch: int, max_tiles: int | None, lines: bool,
                 block: tuple[int, int]) -> list[TileSample]:  # fmt: skip
    """One page's samples (see `doc_samples`)."""
    out, t = [], spec.tile_size
    im, angle = degrade(page.image.copy(), rng)
    plan = plan_tiles(spec, *im.size, max_tiles)
    cols, rows = plan.grid
    bw, bh = min(block[0], cols), min(block[1], rows)
    glyphs = page_glyphs(page, angle, im.size, (cols * t / im.width, rows * t / im.height))
    found = {}
    for r in range(0, rows - bh + 1, bh):
        for c in range(0, cols - bw + 1, bw):
            if f := region_lines(glyphs, (c * t, r * t, (c + bw) * t, (r + bh) * t)):
                found[c, r] = f
    if not found:
        return out
    sub = plan_tiles(spec, bw * t, bh * t, max(max_tiles or spec.max_tiles, bw * bh))
    if sub.grid != (bw, bh):
        raise DataError(f"block {bw}x{bh}: the tiling rule gives a {sub.grid} grid for its {bw * t}x{bh * t} px")
    chars = rotate_points(page_chars(page), angle, im.size)
    resized = im.resize((cols * t, rows * t), Image.Resampling.BICUBIC)
    whole = None if lines else patch_targets(chars, plan, spec, im.size, patch)
    for (c, r), lines_here in found.items():
        crop = resized.crop((c * t, r * t, (c + bw) * t, (r + bh) * t))
        targets = whole
        if lines:
            text, top, bottom, n = lines_here[rng.randrange(len(lines_here))]
            fill = tuple(int(v) for v in np.median(np.asarray(crop).reshape(-1, 3), axis=0))
            draw, above, below = ImageDraw.Draw(crop), max(0, int(top) - 2), max(0, int(bottom) + 3)
            if above > 0:
                draw.rectangle((0, 0, crop.width, above - 1), fill=fill)
            if below < crop.height:
                draw.rectangle((0, below, crop.width, crop.height), fill=fill)
            targets = patch_targets([ch for ch in chars if ch[3] == n], plan, spec, im.size, patch)
        else:
            text = "\n".join(f[0] for f in lines_here)
        keep = [(r + i) * cols + c + j for i in range(bh) for j in range(bw)]
        y = targets[keep]
        if sub.thumbnail:
            y = torch.cat([y, torch.full_like(y[:1], -1)])
        out.append(TileSample(make_tiles(crop, spec, sub), y, text, sub))
    return out


def doc_samples(kind: str, seed: int, rng: random.Random, spec: TileSpec, patch: int, max_tiles: int | None,
                lines: bool, block: tuple[int, int] = (1, 1)) -> list[TileSample]:  # fmt: skip
    """One document's samples: each block of `block` (columns, rows) grid tiles with text, at
    block-aligned places, as an image of its own (the processor's tiles of it, thumbnail included when
    it has one), with its text; with `lines`, one line of it, the other pixel rows painted over."""
    pages = make_doc(kind, seed, augment_strength=0).clean
    return [s for page in pages for s in page_samples(page, rng, spec, patch, max_tiles, lines, block)]


def step_samples(step: int, cfg: TrainConfig, spec: TileSpec, patch: int) -> list[TileSample]:
    """The samples of one optimizer step: deterministic in (seed, step); training seeds only."""
    rng = random.Random(f"readout:{cfg.seed}:{step}")
    lines, block = step < cfg.lines_steps, tuple(cfg.block)
    n_random = round(cfg.random_text * cfg.batch_size)
    noise = []
    while len(noise) < n_random:
        page = random_text_page(rng, spec.tile_size, 1 if lines else rng.randint(1, 10))
        noise += page_samples(page, rng, spec, patch, cfg.max_tiles, lines, (1, 1))
    pool: list[TileSample] = []
    while len(pool) < cfg.batch_size - n_random:
        kind, seed = rng.choice(KINDS), rng.randrange(EVAL_SEED_START)
        pool += doc_samples(kind, seed, rng, spec, patch, cfg.max_tiles, lines, block)
    return rng.sample(pool, cfg.batch_size - n_random) + noise[:n_random]


def eval_samples(spec: TileSpec, patch: int, max_tiles: int | None, lines: bool, block=(1, 1)) -> list[TileSample]:
    pool = [s for k in KINDS for i in range(EVAL_DOCS)
            for s in doc_samples(k, EVAL_SEED_START + i, random.Random(f"readout-eval:{k}:{i}"), spec, patch,
                                 max_tiles, lines, block)]  # fmt: skip
    return pool[:: max(1, len(pool) // EVAL_TILES)][:EVAL_TILES]


def shuffle_cells(patches: int, ratio: float, version: str) -> torch.Tensor:
    """(image tokens, patches per token): which patches the pixel shuffle puts in each image token,
    found by shuffling the patch indices themselves."""
    idx = torch.arange(patches, dtype=torch.float64)[None, :, None]
    return pixel_shuffle(idx, ratio, version)[0].round().long()


def char_token_ids(tokenizer) -> torch.Tensor:
    """(CLASSES,) the vocabulary id of each character class's single-character token; -1 for empty,
    other, and characters the tokenizer does not keep as one token."""
    ids = torch.full((CLASSES,), -1, dtype=torch.long)
    for i, c in enumerate(CHARSET, start=1):
        enc = tokenizer.encode(c, add_special_tokens=False)
        if len(enc) == 1:
            ids[i] = enc[0]
    return ids


class ReadoutModel(nn.Module):
    """The VLM with stage vision's character head: a batch of one-tile samples in, the answer tokens'
    summed cross-entropy and the two auxiliary losses out."""

    def __init__(self, vlm, head: nn.Linear, context_id: int, char_ids: torch.Tensor, cells: torch.Tensor):
        super().__init__()
        self.vlm, self.head, self.context_id = vlm, head, context_id
        self.register_buffer("char_ids", char_ids, persistent=False)
        self.register_buffer("cells", cells, persistent=False)

    def image_embeds(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch features, image tokens) of (tiles, 3, S, S)."""
        cfg = self.vlm.config
        feats = self.vlm.vision_model(pixels)
        return feats, self.vlm.project(pixel_shuffle(feats, cfg.downsample_ratio, cfg.ps_version))

    def embed_loss(self, img: torch.Tensor, chars: torch.Tensor) -> torch.Tensor:
        table = self.vlm.language_model.model.embed_tokens.weight
        classes = chars[:, self.cells].flatten(2)  # (tiles, tokens, patches per token * SLOTS)
        ids = torch.where(classes < 0, -1, self.char_ids[classes.clamp(min=0)])
        counts = torch.zeros(*ids.shape[:2], table.shape[0], device=img.device)
        counts.scatter_add_(-1, ids.clamp(min=0), (ids >= 0).float())
        has = counts.sum(-1) > 0
        if not has.any():
            return img.sum() * 0
        q = counts[has] / counts[has].sum(-1, keepdim=True)
        logits = COSINE_SCALE * F.normalize(img[has].float(), dim=-1) @ F.normalize(table.float(), dim=-1).T
        return -(q * F.log_softmax(logits, -1)).sum(-1).mean()

    def forward(self, ids, targets, pixels, chars):
        feats, img = self.image_embeds(pixels)
        lm = self.vlm.language_model
        x = merge_embeddings(lm.embed(ids), ids, self.context_id, img.flatten(0, 1))
        logits = lm(embeds=x)
        answer = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        char = slot_loss(self.head, feats, chars) if self.head.weight.requires_grad else feats.sum() * 0
        return answer, char, self.embed_loss(img, chars)


def encode(samples: list[TileSample], encoder: Encoder, pad_id: int):
    """(ids, targets) (B, L), right-padded, and each prompt's length."""
    rows = []
    for s in samples:
        msgs = [{"role": "user", "content": "<image>\n" + TRANSCRIBE}, {"role": "assistant", "content": s.text}]
        rows.append(encoder.encode(Record("readout", msgs, []), [s.plan]))
    L = max(len(e.ids) for e in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    for b, e in enumerate(rows):
        ids[b, : len(e.ids)], targets[b, : len(e.ids)] = torch.tensor(e.ids), torch.tensor(e.targets)
    prompts = [next(i for i, t in enumerate(e.targets) if t != IGNORE) + 1 for e in rows]
    return ids, targets, prompts


@torch.no_grad()
def transcribe_cer(model: ReadoutModel, samples: list[TileSample], encoder: Encoder, tok, eos_ids,
                   batch: int = 16) -> float:  # fmt: skip
    """Greedy transcriptions of the samples -> CER over all their gold characters."""
    lm, edits, chars = model.vlm.language_model, 0.0, 0
    for i in range(0, len(samples), batch):
        part = samples[i : i + batch]
        ids, targets, prompts = encode(part, encoder, 0)
        longest = int((targets != IGNORE).sum(1).max())
        _, img = model.image_embeds(torch.cat([s.pixels for s in part]).to(lm.device))
        ids = ids.to(lm.device)
        x = merge_embeddings(lm.embed(ids), ids, model.context_id, img.flatten(0, 1))
        prompt_ids = [row[:n].tolist() for row, n in zip(ids, prompts)]
        embeds = [row[:n] for row, n in zip(x, prompts)]
        gen = TokenGenerator(lm, prompt_ids, SamplingParams(max_new_tokens=longest + 16), eos_ids, embeds=embeds)
        for _ in gen:
            pass
        for s, out in zip(part, gen.output_ids):
            gold = s.text.strip()
            edits += min(1.0, cer(tok.decode(out, skip_special_tokens=True), gold)) * len(gold)
            chars += len(gold)
    return edits / max(chars, 1)


class ReadoutStage(Stage):
    """One optimizer step of the read-out: the step's rendered tiles, the answer loss plus the
    weighted auxiliaries; held-out greedy CER at every checkpoint."""

    def __init__(self, run: Run, model: ReadoutModel, spec: TileSpec, patch: int, encoder: Encoder, tok, eos_ids,
                 pad_id: int):  # fmt: skip
        self.run, self.model, self.spec, self.patch, self.encoder = run, model, spec, patch, encoder
        self.tok, self.eos_ids, self.pad_id = tok, eos_ids, pad_id
        block = tuple(run.cfg.block)
        self.val = {name: eval_samples(spec, patch, run.cfg.max_tiles, lines, block) for name, lines in
                    (("val_cer", False), ("val_line_cer", True))}  # fmt: skip

    def step(self, step: int) -> dict[str, float]:
        cfg, device = self.run.cfg, self.run.device
        samples = step_samples(step, cfg, self.spec, self.patch)
        ids, targets, _ = encode(samples, self.encoder, self.pad_id)
        n = int((targets != IGNORE).sum())
        pixels, chars = torch.cat([s.pixels for s in samples]), torch.cat([s.chars for s in samples])
        with self.run.autocast():
            answer, char, embed = self.model(ids.to(device), targets.to(device), pixels.to(device), chars.to(device))
        (answer / n + cfg.char_loss * char + cfg.embed_loss * embed).backward()
        return {"answer_sum": answer.item(), "answer_tokens": n, "char": char.item(), "embed": embed.item()}

    def report(self, totals: dict[str, float], dt: float) -> tuple[float, dict]:
        rate = self.run.cfg.batch_size / dt
        fields = {"char_loss": totals["char"], "embed_loss": totals["embed"], "tiles_per_s": rate}
        return totals["answer_sum"] / totals["answer_tokens"], fields

    def at_save(self) -> dict:
        self.model.eval()
        out = {name: transcribe_cer(self.model, samples, self.encoder, self.tok, self.eos_ids)
               for name, samples in self.val.items()}  # fmt: skip
        self.model.train()
        return out

    def postfix(self, row: dict) -> dict:
        return {"cer": f"{row['val_cer']:.3f}", "line_cer": f"{row['val_line_cer']:.3f}"} if "val_cer" in row else {}


def load_char_head(folder: str | None, width: int) -> nn.Linear:
    """Stage vision's character head from the latest checkpoint under `folder` (None: a new head)."""
    head = nn.Linear(width, SLOTS * CLASSES)
    if folder is None:
        return head
    latest = Checkpoints(Path(folder), 1).latest()
    if latest is None:
        raise DataError(f"char_head: {folder} holds no stage-vision checkpoint (checkpoints/latest)")
    saved = load_file(latest / "trainable.safetensors")
    try:
        head.load_state_dict({"weight": saved["head.weight"], "bias": saved["head.bias"]})
    except (KeyError, RuntimeError) as e:
        raise DataError(f"char_head: {latest} has no character head of width {width} ({e})") from None
    return head


def train_readout(cfg: TrainConfig, restart: bool = False) -> dict:
    """The read-out stage (see the module docstring); resumable like every stage."""
    from nanovl.tokenizer import Tokenizer

    run, ckpt, vlm = open_synth_stage(cfg, restart)
    tok = Tokenizer(cfg.model, ckpt.text.eos_token_ids)
    spec, patch, width = vlm.config.tiles, vlm.config.vision.patch_size, vlm.config.vision.hidden_size
    vlm.mlp1.requires_grad_(True)
    vlm.language_model.requires_grad_(True)
    vlm.vision_model.requires_grad_(cfg.train_vision)
    torch.manual_seed(cfg.seed)
    head = load_char_head(cfg.char_head, width)
    head.requires_grad_(cfg.char_loss > 0)
    cells = shuffle_cells((spec.tile_size // patch) ** 2, vlm.config.downsample_ratio, vlm.config.ps_version)
    model = ReadoutModel(vlm, head, tok.token_to_id(vlm.context_token), char_token_ids(tok), cells)
    info = {"config": config_dict(cfg), "world": 1}
    opt, start = run.start(model, info, {"vlm.vision_model.": cfg.vision_lr_scale})
    pad_id = tok.token_to_id(tok.special_tokens.get("pad_token") or "") or 0
    encoder = Encoder(tok, spec, vlm.image_text)
    stage = ReadoutStage(run, model, spec, patch, encoder, tok, tok.eos_token_ids, pad_id)
    n_train = sum(p.numel() for p in run.trainable)
    run.announce(start, f"{n_train:,} parameters trainable, {cfg.batch_size} tiles of {spec.tile_size} px a step "
                 f"(single lines until step {cfg.lines_steps}), {EVAL_TILES} held-out tiles, {run.device}")  # fmt: skip
    step, loss = run.loop(stage, model, opt, start, info)
    rows = [json.loads(ln) for ln in run.metrics.read_text().splitlines() if ln.strip()]
    last = next((r for r in reversed(rows) if "val_cer" in r), {})
    saved = export_model(vlm, ckpt, cfg.model, run.out / "model", vlm=True)
    return {"steps": step, "loss": loss, "val_cer": last.get("val_cer"), "val_line_cer": last.get("val_line_cer"),
            "out": str(run.out), "saved": str(saved), "plot": run.plot(),
            "already_done": start >= cfg.steps}  # fmt: skip
