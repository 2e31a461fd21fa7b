"""The vision stage and the reading data of the bundled model's recipe: character positions that follow
the pixels, per-patch targets, crops with their text, and the stage's training run (resume, export,
config errors)."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from nanovl.errors import DataError
from nanovl.synth import KINDS, make_doc, rotate_points, write_dataset
from nanovl.synth.records import crop_text
from nanovl.tiling import TileSpec, make_tiles, plan_tiles
from nanovl.tiny import write_checkpoint
from nanovl.train.config import load_train_config
from nanovl.train.trainer import train
from nanovl.train.vision import SLOTS, page_chars, patch_targets

SPEC = TileSpec("nano_vl", 256, 1, 12, True, 64)


@pytest.mark.parametrize("angle", [-1.5, 0.7, 1.2])
def test_rotated_points_follow_the_pixels(angle):
    im = Image.new("L", (700, 500), 255)
    dots = [(40, 30), (650, 60), (350, 250), (90, 460), (610, 430)]
    for x, y in dots:
        ImageDraw.Draw(im).ellipse((x - 3, y - 3, x + 3, y + 3), fill=0)
    rotated = np.asarray(im.rotate(angle, resample=Image.BICUBIC, fillcolor=255))
    for (x, y), (px, py) in zip(dots, rotate_points(dots, angle, im.size)):
        ys, xs = np.nonzero(rotated[int(py) - 12 : int(py) + 13, int(px) - 12 : int(px) + 13] < 128)
        assert len(xs), f"no ink near the predicted position of {(x, y)}"
        assert abs(xs.mean() - 12 - (px - int(px))) < 1.0 and abs(ys.mean() - 12 - (py - int(py))) < 1.0


@pytest.mark.parametrize("kind", ["invoice", "receipt", "bar_chart"])
def test_patch_targets_fall_on_ink_and_count_every_character(kind):
    """Targets sit where the characters are drawn, one per character."""
    doc = make_doc(kind, 3, augment_strength=0)
    page = doc.clean[0]
    chars = page_chars(page)
    plan = plan_tiles(SPEC, page.width, page.height)
    targets = patch_targets(chars, plan, SPEC, (page.width, page.height), 16)
    cols, rows = plan.grid
    assert targets.shape == (cols * rows, 256, SLOTS)
    # every character is labelled once, unless its patch already holds SLOTS characters
    per_cell = torch.zeros(cols * rows * 256, dtype=torch.long)
    sx, sy = cols * 256 / page.width, rows * 256 / page.height
    for x, y, _, _ in chars:
        X, Y = x * sx, y * sy
        per_cell[(int(Y // 256) * cols + int(X // 256)) * 256 + int(Y % 256 // 16) * 16 + int(X % 256 // 16)] += 1
    assert int((targets > 0).sum()) == int(per_cell.clamp(max=SLOTS).sum()) > 50
    # labelled patches show ink, and on text pages most empty ones do not
    tiles = make_tiles(page.image, SPEC, plan)[: cols * rows].mean(1)  # grey, [0, 1]
    patches = tiles.unfold(1, 16, 16).unfold(2, 16, 16).reshape(cols * rows, 256, 256)
    dark = (patches < 0.6).any(-1)
    labelled = (targets > 0).any(-1)
    assert dark[labelled].all()
    if kind != "bar_chart":  # bars and axes are ink without characters
        assert dark[~labelled].float().mean() < 0.2


def test_crop_of_the_whole_page_is_its_transcription_and_parts_are_substrings():
    for kind in KINDS:
        doc = make_doc(kind, 5)
        page, im, angle = doc.clean[0], doc.pages[0], doc.angles[0]
        assert crop_text(page, 0.0, im.size, (-50, -50, im.width + 50, im.height + 50)) == page.transcription
        rng = random.Random(kind)
        for _ in range(5):
            x0, y0 = rng.randrange(im.width // 2), rng.randrange(im.height // 2)
            part = crop_text(page, angle, im.size, (x0, y0, x0 + 256, y0 + 256))
            for line in part.splitlines():
                assert any(seg in full for full in page.transcription.splitlines() for seg in line.split(" | "))


def test_synth_crops_are_written_with_their_text(tmp_path):
    counts = write_dataset(tmp_path, 1, ["invoice", "table"], crops=3)
    assert counts["crops.jsonl"] >= 4
    for line in (tmp_path / "crops.jsonl").read_text().splitlines():
        r = json.loads(line)
        w, h = Image.open(tmp_path / r["images"][0]).size
        assert w in (256, 512) and h in (256, 512)
        assert r["messages"][1]["content"].strip() and r["meta"]["task"] == "crops"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    write_checkpoint("nemotron-nano-vl-v1", root / "base", image_size=64, vision={"hidden_size": 64})
    return root


def stage(root, name, **fields):
    cfg = {"stage": "vision", "model": str(root / "base"), "out": str(root / name), "data": ["synthdocs"],
           "steps": 6, "batch_size": 8, "lr": 2e-3, "save_every": 3, "max_tiles": 4, "threads": 1,
           **fields}  # fmt: skip
    (root / f"{name}.json").write_text(json.dumps(cfg))
    return load_train_config(root / f"{name}.json")


def test_vision_stage_trains_resumes_and_exports_only_the_encoder(base):
    full = train(stage(base, "full"))
    assert full["val_char_acc"] is not None
    rows = [json.loads(x) for x in (base / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and "val_char_acc" in rows[2]
    # resuming from the step-3 checkpoint (as after a crash) gives the same steps 4-6: same pages, same
    # optimizer state
    ckpts = base / "full" / "checkpoints"
    shutil.rmtree(ckpts / "step-00000006")
    (ckpts / "latest").write_text("step-00000003")
    train(stage(base, "full"))
    again = [json.loads(x)["loss"] for x in (base / "full" / "metrics.jsonl").read_text().splitlines()]
    assert again == pytest.approx([r["loss"] for r in rows], rel=1e-5)
    done = train(stage(base, "full"))  # finished: run again, it trains nothing and reports its last loss
    assert done["already_done"] and done["loss"] == pytest.approx(again[-1])
    before, after = load_file(base / "base" / "model.safetensors"), load_file(base / "full/model/model.safetensors")
    changed = {n for n in after if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("vision_model.") for n in changed)
    assert any("blocks.0.attn.qkv" in n for n in changed)


def test_vision_stage_config_errors(base, tmp_path):
    bad = {"stage": "vision", "model": "m", "out": "o", "data": ["x.jsonl"], "steps": 1}
    (tmp_path / "a.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="synthdocs"):
        load_train_config(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({**bad, "stage": "sft", "data": ["synthdocs"]}))
    with pytest.raises(DataError, match="synthdocs"):
        load_train_config(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps({**bad, "data": ["synthdocs"], "lora": {"rank": 2}}))
    with pytest.raises(DataError, match="vision encoder alone"):
        load_train_config(tmp_path / "c.json")
    write_checkpoint("llama", tmp_path / "llm")
    cfg = {**bad, "model": str(tmp_path / "llm"), "out": str(tmp_path / "o"), "data": ["synthdocs"]}
    (tmp_path / "d.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match="vision-language checkpoint"):
        train(load_train_config(tmp_path / "d.json"))
