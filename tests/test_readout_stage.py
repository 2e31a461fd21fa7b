"""The read-out stage of the bundled model's recipe: the text of each tile, single lines with the rest
painted out, the image tokens' patches, and the stage's training run (auxiliary losses, resume,
export, config errors)."""

import json
import random
import shutil
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from nanovl.errors import DataError
from nanovl.synth import degrade, make_doc
from nanovl.tiling import TileSpec, plan_tiles
from nanovl.tiny import write_checkpoint
from nanovl.tokenizer import Tokenizer
from nanovl.train.config import load_train_config
from nanovl.train.readout import (
    char_token_ids,
    doc_samples,
    page_glyphs,
    page_samples,
    random_text_page,
    region_lines,
    shuffle_cells,
)
from nanovl.train.trainer import train
from nanovl.train.vision import CHARSET

SPEC = TileSpec("nano_vl", 256, 1, 12, True, 64)


def tile_lines(page, angle, size, plan, t):
    """grid tile -> its `region_lines` (tiles without text left out)."""
    cols, rows = plan.grid
    glyphs = page_glyphs(page, angle, size, (cols * t / size[0], rows * t / size[1]))
    found = {r * cols + c: region_lines(glyphs, (c * t, r * t, (c + 1) * t, (r + 1) * t))
             for r in range(rows) for c in range(cols)}  # fmt: skip
    return {k: v for k, v in found.items() if v}


@pytest.mark.parametrize("kind", ["invoice", "form", "table"])
def test_every_character_of_the_page_is_in_exactly_one_tile(kind):
    page = make_doc(kind, 4, augment_strength=0).clean[0]
    plan = plan_tiles(SPEC, page.width, page.height)
    found = tile_lines(page, 0.0, (page.width, page.height), plan, 256)
    pieces = [p for lines in found.values() for text, *_, n in lines for p in text.split(page.lines[n].sep)]
    got = Counter(c for p in pieces for c in p if not c.isspace())  # the separators are not drawn
    drawn = Counter(c for item in page.items for x, y, c in item.chars() if x < page.width and y < page.height)
    assert got == drawn and sum(drawn.values()) > 50
    # each tile's part of a line is made of pieces of that drawn line, in its order
    for lines in found.values():
        for text, top, bottom, n in lines:
            assert 0 - 20 < top < bottom < 256 + 20
            rest = page.lines[n].text
            for piece in text.split():
                assert piece in rest
                rest = rest[rest.index(piece) + len(piece) :]


def test_single_lines_keep_one_line_and_paint_out_the_rest():
    doc = make_doc("receipt", 2, augment_strength=0)
    whole = doc_samples("receipt", 2, random.Random(0), SPEC, 16, None, lines=False)
    lines = doc_samples("receipt", 2, random.Random(0), SPEC, 16, None, lines=True)
    assert len(whole) == len(lines) > 1
    page = doc.clean[0]
    drawn = [line.text for line in page.lines]
    for w, s in zip(whole, lines):
        assert "\n" not in s.text and s.text in w.text.splitlines()
        assert any(s.text in d for d in drawn)
        # rows outside the kept band are one flat colour; the kept rows still show ink
        assert s.pixels.shape[0] == 1 and s.plan.grid == (1, 1) and not s.plan.thumbnail
        grey = s.pixels[0].mean(0)
        flat = (grey == grey[0, 0]).all(1) | (grey == grey[-1, -1]).all(1)
        assert flat.sum() > 100 and (grey[~flat] < 0.5).any()
        assert 0 < int((s.chars > 0).sum()) <= int((w.chars > 0).sum())


def test_blocks_of_tiles_are_images_of_their_own_with_the_text_of_their_tiles():
    tiles = doc_samples("invoice", 6, random.Random(3), SPEC, 16, None, lines=False)
    blocks = doc_samples("invoice", 6, random.Random(3), SPEC, 16, None, lines=False, block=(2, 2))
    assert blocks and all(b.plan.grid == (2, 2) and b.plan.thumbnail and b.pixels.shape[0] == 5 for b in blocks)
    page = make_doc("invoice", 6, augment_strength=0).clean[0]
    im, angle = degrade(page.image.copy(), random.Random(3))  # as doc_samples degrades the first page
    plan = plan_tiles(SPEC, *im.size)
    cols, rows = plan.grid
    by_tile = dict(zip(sorted(tile_lines(page, angle, im.size, plan, 256)), tiles))

    def drawn(text):  # the characters, without the separators the transcription puts between cells
        return Counter(text.replace("|", "").replace("\n", "").replace(" ", ""))

    places = [(c, r) for r in range(0, rows - 1, 2) for c in range(0, cols - 1, 2)]
    assert len(blocks) == len(places)  # one page, text in every block
    for b, (c, r) in zip(blocks, places):
        # the block's grid tiles are the page's tiles at that place; the thumbnail has no character targets
        assert (b.chars[4] == -1).all() and (b.chars[:4] >= 0).all()
        inside = [by_tile[k] for k in ((r + i) * cols + c + j for i in (0, 1) for j in (0, 1)) if k in by_tile]
        assert drawn(b.text) == sum((drawn(t.text) for t in inside), Counter())
        assert torch.equal(b.pixels[0], inside[0].pixels[0]) if (r * cols + c) in by_tile else True


@pytest.mark.parametrize("seed", range(4))
def test_random_text_tiles_show_the_strings_they_are_labelled_with(seed):
    rng = random.Random(seed)
    page = random_text_page(rng, 256, 6)
    assert all(item.bbox[2] <= 256 - 4 and item.bbox[3] <= 256 for item in page.items)
    (sample,) = page_samples(page, rng, SPEC, 16, None, False, (1, 1))
    drawn = Counter(c for item in page.items for c in item.text if not c.isspace())
    got = Counter(c for c in sample.text if not c.isspace())
    assert not got - drawn and sum(got.values()) >= 0.95 * sum(drawn.values())
    # one line: the label is one of the drawn lines (or the part of it left inside the tile)
    (line,) = page_samples(random_text_page(rng, 256, 1), rng, SPEC, 16, None, True, (1, 1))
    assert "\n" not in line.text and line.text


def test_image_tokens_hold_the_2x2_patches_below_and_right_of_them():
    cells = shuffle_cells(256, 0.5, "v2")
    assert cells.shape == (64, 4)
    for t in range(64):
        i, j = divmod(t, 8)
        expect = {(2 * i + a) * 16 + 2 * j + b for a in (0, 1) for b in (0, 1)}
        assert set(cells[t].tolist()) == expect


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("readout")
    write_checkpoint("nemotron-nano-vl-v1", root / "base", image_size=64, vision={"hidden_size": 64})
    vision = {"stage": "vision", "model": str(root / "base"), "out": str(root / "vision"), "data": ["synthdocs"],
              "steps": 2, "batch_size": 4, "lr": 2e-3, "save_every": 2, "max_tiles": 4, "threads": 1}  # fmt: skip
    (root / "vision.json").write_text(json.dumps(vision))
    train(load_train_config(root / "vision.json"))
    return root


def test_character_tokens_decode_to_their_character(base):
    tok = Tokenizer(base / "base")
    ids = char_token_ids(tok)
    kept = [(c, int(ids[i + 1])) for i, c in enumerate(CHARSET) if ids[i + 1] >= 0]
    assert len(kept) >= 90 and ids[0] == -1
    assert all(tok.decode([t]) == c for c, t in kept)


def stage(root, name, **fields):
    cfg = {"stage": "readout", "model": str(root / "base"), "out": str(root / name), "data": ["synthdocs"],
           "steps": 4, "batch_size": 4, "lr": 2e-3, "save_every": 2, "max_tiles": 4, "threads": 1, "lines_steps": 2,
           "train_vision": True, "vision_lr_scale": 0.1, "char_loss": 0.5, "embed_loss": 0.5,
           "char_head": str(root / "vision"), **fields}  # fmt: skip
    (root / f"{name}.json").write_text(json.dumps(cfg))
    return load_train_config(root / f"{name}.json")


def test_readout_stage_trains_resumes_and_exports(base):
    full = train(stage(base, "full"))
    rows = [json.loads(x) for x in (base / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["char_loss"] > 0 and r["embed_loss"] > 0 for r in rows)
    assert 0 <= rows[1]["val_cer"] <= 1 and 0 <= rows[1]["val_line_cer"] <= 1 and full["val_cer"] is not None
    # resuming from the step-2 checkpoint (as after a crash) gives the same steps 3-4
    ckpts = base / "full" / "checkpoints"
    shutil.rmtree(ckpts / "step-00000004")
    (ckpts / "latest").write_text("step-00000002")
    train(stage(base, "full"))
    again = [json.loads(x)["loss"] for x in (base / "full" / "metrics.jsonl").read_text().splitlines()]
    assert again == pytest.approx([r["loss"] for r in rows], rel=1e-5)
    before, after = load_file(base / "base" / "model.safetensors"), load_file(base / "full/model/model.safetensors")
    changed = {n.split(".")[0] for n in after if not torch.equal(before[n], after[n])}
    assert changed == {"vision_model", "mlp1", "language_model"}
    # the encoder's parameter groups run at a tenth of the lr
    groups = json.loads((ckpts / "latest").parent.joinpath("step-00000002", "trainer.json").read_text())["param_groups"]
    assert sorted({g["lr_scale"] for g in groups}) == [0.1, 1.0]


def test_readout_stage_on_blocks_of_tiles(base):
    out = train(stage(base, "blocks", steps=2, block=[2, 2], lines_steps=1, random_text=0.5))
    assert 0 <= out["val_cer"] <= 1
    rows = [json.loads(x) for x in (base / "blocks" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["char_loss"] > 0 for r in rows)


def test_readout_stage_with_the_encoder_frozen_leaves_it_unchanged(base):
    train(stage(base, "frozen", steps=2, train_vision=False, char_loss=0.0, char_head=None))
    before, after = load_file(base / "base" / "model.safetensors"), load_file(base / "frozen/model/model.safetensors")
    changed = {n.split(".")[0] for n in after if not torch.equal(before[n], after[n])}
    assert changed == {"mlp1", "language_model"}


def test_readout_config_errors(base, tmp_path):
    with pytest.raises(DataError, match="char_loss.*train_vision"):
        stage(base, "e1", train_vision=False)
    with pytest.raises(DataError, match="field 'lines_steps' is a field of stage readout"):
        stage(base, "e2", stage="pretrain", data=["x.jsonl"], char_loss=0, embed_loss=0, char_head=None,
              train_vision=False)  # fmt: skip
    with pytest.raises(DataError, match="synthdocs"):
        stage(base, "e3", data=["x.jsonl"])
    with pytest.raises(DataError, match="field 'block' must be"):
        stage(base, "e5", block=[2])
    with pytest.raises(DataError, match="field 'random_text' must be in"):
        stage(base, "e6", random_text=1.5)
    with pytest.raises(DataError, match="holds no stage-vision checkpoint"):
        train(stage(base, "e4", char_head=str(tmp_path)))
