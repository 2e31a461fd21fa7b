"""Training data: conversation records -> token ids, loss labels and tiles -> packed micro-batches.

- Records are JSON lines {"images": [...], "messages": [...]} (nanovl/synth/records.py writes them), or
  WebDataset-style tar shards where sample KEY is KEY.json (the record) plus the image members it
  names. Every record is checked when the set is opened; a bad one is an error naming file and line
  (or shard and key), or, with skip_bad, a counted skip.
- Tokens follow the model's own chat template and tiling: the conversation is rendered turn by turn,
  and only the text each assistant turn adds is trained on (labels of everything else are -100).
  The `<image>` placeholders become the family's image text for the tile plan of that image, under a
  per-image tile budget and an optional per-sample one (all images of a sample together).
- A micro-batch is a fixed number of samples; with packing they are laid first-fit-decreasing into
  rows no longer than its longest sample (less padding, no larger attention matrices); positions
  restart at each sample and a block-diagonal causal mask keeps samples apart (attention-only
  decoders; a hybrid Mamba decoder gets one sample per row).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanovl.errors import DataError
from nanovl.media import Page, scan_document
from nanovl.processor import image_pixels, plan_images
from nanovl.prompts import PLACEHOLDERS, expand_media
from nanovl.tiling import TilePlan, TileSpec, plan_tiles

IGNORE = -100
ROLES = ("system", "user", "assistant")


@dataclass
class Record:
    source: str  # "file:line" or "shard.tar:key", for messages
    messages: list[dict]
    images: list  # Path, or (tar path, byte offset, size) of a shard member


@dataclass
class Example:
    source: str
    ids: list[int]
    targets: list[int]  # next-token labels, IGNORE where not trained on (already shifted)
    images: list
    plans: list[TilePlan]


@dataclass
class Skips:
    reasons: Counter = field(default_factory=Counter)

    def add(self, reason: str):
        self.reasons[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.reasons.values())


def check_record(r, where: str, image_count: int) -> list[dict]:
    """The record's messages, or DataError saying what is wrong with it."""
    if not isinstance(r, dict) or not isinstance(r.get("messages"), list) or not r["messages"]:
        raise DataError(f"{where}: expected an object with a non-empty 'messages' list")
    for m in r["messages"]:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role ({', '.join(ROLES)}) and string content")
    if not any(m["role"] == "assistant" for m in r["messages"]):
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    placeholders = sum(m["content"].count(PLACEHOLDERS["image"]) for m in r["messages"])
    if placeholders != image_count:
        raise DataError(f"{where}: {placeholders} <image> placeholder(s) for {image_count} image(s)")
    if (r.get("meta") or {}).get("split") == "eval":
        raise DataError(f"{where}: an evaluation record (meta.split = eval) in training data")
    return r["messages"]


def read_jsonl(path: Path, skip_bad: bool, skips: Skips) -> list[Record]:
    if not path.is_file():
        raise DataError(f"{path}: not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path}:{n}"
        try:
            if not line.strip():
                raise DataError(f"{where}: empty line")
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            images = r.get("images", []) if isinstance(r, dict) else []
            if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                raise DataError(f"{where}: 'images' must be a list of paths")
            messages = check_record(r, where, len(images))
            paths = [path.parent / p for p in images]
            for p in paths:
                if not p.is_file():
                    raise DataError(f"{where}: image {p} not found")
            out.append(Record(where, messages, paths))
        except DataError as e:
            if not skip_bad:
                raise
            skips.add(str(e).split(": ", 1)[1].split(" (")[0])
    return out


def read_shard(path: Path, skip_bad: bool, skips: Skips) -> list[Record]:
    """KEY.json records and their image members, from a WebDataset-style tar."""
    try:
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            names = set(members)
            jsons = sorted(n for n in names if n.endswith(".json"))
            out = []
            for name in jsons:
                where = f"{path}:{name[: -len('.json')]}"
                try:
                    try:
                        r = json.loads(tar.extractfile(name).read())
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
                    images = r.get("images", []) if isinstance(r, dict) else []
                    messages = check_record(r, where, len(images))
                    for m in images:
                        if m not in names:
                            raise DataError(f"{where}: image member {m} not in the shard")
                    # (shard, byte offset, size): an image is one seek + read, not a scan of the tar
                    out.append(
                        Record(where, messages, [(path, members[m].offset_data, members[m].size) for m in images])
                    )
                except DataError as e:
                    if not skip_bad:
                        raise
                    skips.add(str(e).split(": ", 1)[1].split(" (")[0])
            return out
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: not a readable tar shard ({e})") from None


def read_records(paths: list[str | Path], skip_bad: bool = False, skips: Skips | None = None) -> list[Record]:
    """Records from JSONL files, tar shards, or folders of tar shards, in the order given."""
    skips = skips if skips is not None else Skips()
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            shards = sorted(p.glob("*.tar"))
            if not shards:
                raise DataError(f"{p}: a folder with no .tar shards")
            for s in shards:
                out += read_shard(s, skip_bad, skips)
        elif p.suffix == ".tar":
            out += read_shard(p, skip_bad, skips)
        else:
            out += read_jsonl(p, skip_bad, skips)
    return out


def write_shards(records_jsonl: str | Path, out_dir: str | Path, per_shard: int = 1000) -> list[Path]:
    """Re-pack a JSONL set (images beside it) as tar shards of `per_shard` samples each."""
    src, out = Path(records_jsonl), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = read_jsonl(src, False, Skips())
    shards = []
    for s in range(0, len(records), per_shard):
        path = out / f"shard-{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for k, r in enumerate(records[s : s + per_shard], s):
                key = f"{k:08d}"
                members = [f"{key}.{i}{Path(p).suffix}" for i, p in enumerate(r.images)]
                for p, m in zip(r.images, members):
                    tar.add(p, arcname=m)
                data = json.dumps({"messages": r.messages, "images": members}).encode()
                info = tarfile.TarInfo(f"{key}.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def open_page(src) -> Page:
    """An image of a record as inference reads it (media: EXIF rotation, alpha on white, 16-bit, the
    pixel cap), sized from its header and decoded when its tiles are made."""
    if isinstance(src, tuple):  # a member of a tar shard
        path, offset, size = src
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        src = data
    pages = scan_document(src)
    if len(pages) != 1:
        raise DataError(f"{src if isinstance(src, Path) else 'a shard member'}: {len(pages)} pages; a record's "
                        "image must be one image")  # fmt: skip
    return pages[0]


class Encoder:
    """Conversation -> (ids, targets) with the checkpoint's chat template, tiling and image text."""

    def __init__(self, tokenizer, tiles: TileSpec | None = None, image_text=None, max_tiles: int | None = None,
                 sample_tiles: int | None = None):  # fmt: skip
        self.tok, self.tiles, self.image_text = tokenizer, tiles, image_text
        self.max_tiles = max_tiles if max_tiles is not None else (tiles.max_tiles if tiles else None)
        self.sample_tiles = sample_tiles

    def plans(self, record: Record) -> list[TilePlan]:
        """Tile plans of the record's images (processor.plan_images): at most max_tiles each and, with a
        per-sample budget, the per-image budget lowered until all images together fit it."""
        sizes = [open_page(p).size for p in record.images]
        plans = plan_images(self.tiles, sizes, self.max_tiles, self.sample_tiles)
        if plans is None:
            least = sum(plan_tiles(self.tiles, *size, max_tiles=self.tiles.min_tiles).tiles for size in sizes)
            raise DataError(f"{record.source}: {len(sizes)} images need {least} tiles "
                            f"at the least, over sample_tiles {self.sample_tiles}")  # fmt: skip
        return plans

    def segments(self, messages: list[dict], where: str) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, trained?) pieces: each assistant turn's own text is
        trained on; the template must render every conversation prefix as a prefix of the whole."""
        full = self.tok.apply_chat_template(messages, add_generation_prompt=False)
        pieces, done = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.tok.apply_chat_template(messages[:i], add_generation_prompt=True)
            upto = self.tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
            if not (full.startswith(upto) and upto.startswith(before) and len(before) >= done):
                raise DataError(f"{where}: the chat template does not render turn by turn, so assistant "
                                "tokens cannot be located")  # fmt: skip
            pieces += [(full[done : len(before)], False), (upto[len(before) :], True)]
            done = len(upto)
        pieces.append((full[done:], False))
        return [(t, trained) for t, trained in pieces if t]

    def encode(self, record: Record, plans: list[TilePlan] | None = None) -> Example:
        """The record's ids and labels; `plans`: its images' tile plans when the images are not files
        (stage readout renders them), else planned from the files."""
        if (plans or record.images) and self.image_text is None:
            raise DataError(f"{record.source}: images given to a text-only model")
        if plans is None:
            plans = self.plans(record) if record.images else []
        ids, labels, k = [], [], 0
        for text, trained in self.segments(record.messages, record.source):
            n = text.count(PLACEHOLDERS["image"])
            items = [("image", self.image_text(plan)) for plan in plans[k : k + n]]
            k += n
            piece = self.tok.encode(expand_media(text, items), add_special_tokens=False)
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        return Example(record.source, ids, labels[1:] + [IGNORE], record.images, plans)


@dataclass
class Batch:
    ids: torch.Tensor  # (B, L)
    targets: torch.Tensor  # (B, L), IGNORE = no loss
    positions: torch.Tensor  # (B, L)
    mask: torch.Tensor | None  # (B, 1, L, L) bool block-causal when packed, None = plain causal
    pixels: torch.Tensor | None  # (tiles, 3, S, S), in the order of the rows' image tokens
    tokens: int  # real (non-pad) tokens
    samples: int


def pack_rows(lengths: list[int], seq_len: int, pack: bool) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing into rows no longer than the longest sample (so
    packing removes padding without growing the attention matrix), or one sample per row."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    seq_len = min(seq_len, max(lengths))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(seq_len - lengths[i])
    return rows


def collate(examples: list[Example], tiles: TileSpec | None, seq_len: int, pack: bool, pad_id: int) -> Batch:
    rows = pack_rows([len(e.ids) for e in examples], seq_len, pack)
    L = max(sum(len(examples[i].ids) for i in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    targets = torch.full((B, L), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, L), dtype=torch.long)
    doc = torch.full((B, L), -1, dtype=torch.long)  # padding is its own "document"
    pixels = []
    for b, row in enumerate(rows):
        t = 0
        for d, i in enumerate(row):
            e = examples[i]
            n = len(e.ids)
            ids[b, t : t + n] = torch.tensor(e.ids)
            targets[b, t : t + n] = torch.tensor(e.targets)
            positions[b, t : t + n] = torch.arange(n)
            doc[b, t : t + n] = d
            t += n
            pixels += [image_pixels(open_page(src), tiles, plan) for src, plan in zip(e.images, e.plans)]
        positions[b, t:] = torch.arange(L - t)
    mask = None
    if any(len(row) > 1 for row in rows):
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, L, L)
    tokens = sum(len(e.ids) for e in examples)
    return Batch(ids, targets, positions, mask, torch.cat(pixels) if pixels else None, tokens, len(examples))
