"""Tile grids against references, token counts for the real configs, and tile pixels against
transformers' InternVL (GotOcr2) image processor."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)

from nanovl.models.vlm import NVLMD, NemotronNanoVL
from nanovl.tiling import IMAGENET_MEAN, IMAGENET_STD, TileSpec, candidate_grids, make_tiles, plan_tiles


def sizes():
    """300 image sizes: extremes, tiny, exact aspect ties, tile multiples, and random ones."""
    fixed = [
        (1, 50),
        (50, 1),
        (3000, 20),
        (20, 3000),
        (1, 1),
        (2, 3),
        (7, 1),
        (10000, 10),
        (512, 512),
        (1024, 512),
        (512, 1024),
        (1536, 1024),
        (448, 448),
        (896, 448),
        (1344, 896),
        (2048, 2048),
        (1000, 500),
        (100, 50),
        (1200, 400),
        (300, 100),
        (4096, 256),
        (255, 511),
        (513, 1025),
        (1792, 448),
        (448, 2688),
        (5000, 5000),
        (1191, 1684),
        (612, 792),
        (2480, 3508),
        (720, 1280),
    ]
    rng = random.Random(0)
    rand = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(240)]
    ties = [(k * a, k * b) for k in (1, 50, 300) for a, b in [(2, 1), (1, 2), (3, 2), (4, 3), (1, 1)]]
    return fixed + rand + ties


def nano_vl_reference(w, h, tile, lo, hi):
    """The Nano-VL-8B rule written from its definition: the first grid (in increasing tile count)
    with the largest min(tiles * tile^2 / area, 0.6) * min(r / a, a / r)."""
    grids = candidate_grids(lo, hi)
    scores = [min(c * r * tile * tile / (w * h), 0.6) * min((c / r) / (w / h), (w / h) / (c / r)) for c, r in grids]
    return grids[scores.index(max(scores))]


@pytest.mark.parametrize("hi", [1, 2, 6, 12])
def test_internvl_rule_matches_transformers(hi):
    spec = TileSpec("internvl", 448, 1, hi, True, 256)
    for w, h in sizes():
        assert plan_tiles(spec, w, h).grid == get_optimal_tiled_canvas((h, w), (448, 448), 1, hi), (w, h)


@pytest.mark.parametrize("hi", [1, 2, 6, 12])
def test_nano_vl_rule_matches_reference(hi):
    spec = TileSpec("nano_vl", 512, 1, hi, True, 256)
    for w, h in sizes():
        assert plan_tiles(spec, w, h).grid == nano_vl_reference(w, h, 512, 1, hi), (w, h)


def test_rules_on_known_cases():
    nano = TileSpec("nano_vl", 512, 1, 12, True, 256)
    intern = TileSpec("internvl", 448, 1, 6, True, 256)
    # exact aspect tie between 2x1 and 4x2: the larger grid only while the image covers > half its area
    assert plan_tiles(intern, 1000, 500).grid == (2, 1)
    assert plan_tiles(intern, 2000, 1000).grid == (2, 1)  # 4x2 is 8 tiles > 6: not a candidate
    assert plan_tiles(TileSpec("internvl", 448, 1, 12, True, 256), 2000, 1000).grid == (4, 2)
    # the size factor caps at 0.6: a small square page stays one tile, a large one grows
    assert plan_tiles(nano, 300, 300).grid == (1, 1) and not plan_tiles(nano, 300, 300).thumbnail
    assert plan_tiles(nano, 1191, 1684).grid == (3, 4)
    p = plan_tiles(nano, 3000, 20)
    assert p.tiles == p.grid[0] * p.grid[1] + 1 and p.image_tokens == 256 * p.tiles
    assert plan_tiles(nano, 3000, 3000, max_tiles=1).tiles == 1  # the per-request budget


def test_token_counts_for_the_real_configs():
    nano = NemotronNanoVL.tile_spec(
        {"force_image_size": 512, "downsample_ratio": 0.5, "vision_config": {"patch_size": 16}},
        {"max_num_tiles": 12, "use_thumbnail": True},
    )
    nvlm = NVLMD.tile_spec(
        {
            "force_image_size": 448,
            "downsample_ratio": 0.5,
            "vision_config": {"patch_size": 14, "image_size": 448},
            "max_dynamic_patch": 6,
            "min_dynamic_patch": 1,
            "use_thumbnail": True,
            "dynamic_image_size": True,
        },
        {},
    )
    assert nano.tokens_per_tile == 256 and nvlm.tokens_per_tile == 256
    for spec in (nano, nvlm):
        for w, h in sizes()[:80]:
            p = plan_tiles(spec, w, h)
            assert p.image_tokens == p.tiles * 256 and p.tiles <= spec.max_tiles + 1


def test_missing_max_tiles_is_announced():
    with pytest.warns(UserWarning, match="max_dynamic_patch not found.*using 12"):
        spec = NemotronNanoVL.tile_spec({"force_image_size": 512, "vision_config": {}, "use_thumbnail": True}, {})
    assert spec.max_tiles == 12


@pytest.mark.parametrize("size", [(1000, 700), (300, 900), (448, 448), (2000, 150)])
def test_nvlm_tiles_match_transformers_processor(size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ref = GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        min_patches=1,
        max_patches=6,
        size={"height": 448, "width": 448},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    want = ref(image, return_tensors="pt")["pixel_values"]
    spec = TileSpec("internvl", 448, 1, 6, True, 256, IMAGENET_MEAN, IMAGENET_STD)
    got = make_tiles(image, spec, plan_tiles(spec, *size))
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5


def test_tiles_are_row_major_with_thumbnail_last():
    spec = TileSpec("nano_vl", 64, 1, 12, True, 16)
    image = Image.new("RGB", (128, 64))
    image.paste((255, 0, 0), (0, 0, 64, 64))
    image.paste((0, 0, 255), (64, 0, 128, 64))
    plan = plan_tiles(spec, 128, 64)
    assert plan.grid == (2, 1) and plan.thumbnail
    x = make_tiles(image, spec, plan)
    assert x.shape == (3, 3, 64, 64)
    assert torch.allclose(x[0, :, 32, 32], torch.tensor([1.0, 0, 0]))
    assert torch.allclose(x[1, :, 32, 32], torch.tensor([0, 0, 1.0]))
    assert torch.allclose(x[2, :, 32, 8], torch.tensor([1.0, 0, 0]), atol=0.02)  # thumbnail: left half red
