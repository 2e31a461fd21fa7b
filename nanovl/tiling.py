"""Tiles: pick a grid for an image, resize, cut into square tiles, add the thumbnail, normalise.

Two grid rules, both over the candidate grids (columns, rows) with min <= columns * rows <= max, in the
order the reference code builds them (a set, sorted by tile count):
- `nano_vl` (Llama-3.1-Nemotron-Nano-VL-8B-V1): maximise size_factor * ratio_closeness, where
  size_factor = min(tiles * tile^2 / image_area, 0.6) and ratio_closeness = min(r/a, a/r) for the
  grid's aspect r and the image's aspect a; the first maximum wins.
- `internvl` (NVLM-D, and the 12B V2): minimise |a - r|; on an exact tie the later (larger) grid
  wins while the image area exceeds half the grid's pixel area.
The image is resized to (columns * tile, rows * tile) with PIL's bicubic filter, cut row-major, and,
when there is more than one tile and the checkpoint asks for it, a thumbnail of the whole image
resized to one tile is appended last.

Where normalisation happens is the family's choice (`TileSpec.mean` / `std`): none here for the 8B,
whose RADIO normalises inside the model; ImageNet constants here for NVLM-D.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from nanovl.errors import RequestError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TileSpec:
    rule: str  # "nano_vl" | "internvl"
    tile_size: int
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    tokens_per_tile: int
    mean: tuple[float, float, float] | None = None  # normalise in the processor; None = in the model
    std: tuple[float, float, float] | None = None
    resize: str = "pil"  # "pil": Pillow bicubic; "torch": F.interpolate bicubic with antialias (12B V2)


@dataclass(frozen=True)
class TilePlan:
    grid: tuple[int, int]  # (columns, rows)
    thumbnail: bool
    tokens_per_tile: int

    @property
    def tiles(self) -> int:
        """Tiles fed to the encoder, thumbnail included."""
        return self.grid[0] * self.grid[1] + self.thumbnail

    @property
    def image_tokens(self) -> int:
        return self.tiles * self.tokens_per_tile

    def as_dict(self) -> dict:
        return {
            "grid": list(self.grid),
            "tiles": self.tiles,
            "thumbnail": self.thumbnail,
            "image_tokens": self.image_tokens,
        }


MAX_TILES_LIMIT = 1024  # a per-image budget above this is refused (a 32 x 32 grid of tiles)


@functools.lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every (columns, rows) with min <= columns * rows <= max, sorted by tile count (stable, so grids
    of one count keep the reference's order: the set {(i, j)} sorted by i * j)."""
    if max_tiles > MAX_TILES_LIMIT:
        raise ValueError(f"max tiles {max_tiles} is above the limit of {MAX_TILES_LIMIT}")
    # The reference's set comprehension (n = min..max, i and j = 1..n) is cubic; its distinct
    # elements, inserted in the same order, give the same set (and iteration order) in O(max log max):
    # at step n the new pairs are those with max(i, j) = n.
    first = []
    for n in range(min_tiles, max_tiles + 1):
        if n == min_tiles:
            first += [(i, j) for i in range(1, n + 1) for j in range(1, n + 1)]
        else:
            first += [(i, n) for i in range(1, min(n - 1, max_tiles // n) + 1)]
            first += [(n, j) for j in range(1, min(n, max_tiles // n) + 1)]
    grids = {g for g in first if min_tiles <= g[0] * g[1] <= max_tiles}
    return sorted(grids, key=lambda g: g[0] * g[1])


def grid_nano_vl(width: int, height: int, tile: int, grids: list[tuple[int, int]]) -> tuple[int, int]:
    aspect, area = width / height, width * height
    best, best_factor = (1, 1), float("-inf")
    for cols, rows in grids:
        r = cols / rows
        factor = min(cols * rows * tile * tile / area, 0.6) * min(r / aspect, aspect / r)
        if factor > best_factor:
            best, best_factor = (cols, rows), factor
    return best


def grid_internvl(width: int, height: int, tile: int, grids: list[tuple[int, int]]) -> tuple[int, int]:
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


GRID_RULES = {"nano_vl": grid_nano_vl, "internvl": grid_internvl}


def plan_tiles(spec: TileSpec, width: int, height: int, max_tiles: int | None = None) -> TilePlan:
    top = spec.max_tiles if max_tiles is None else max_tiles
    if not spec.min_tiles <= top <= MAX_TILES_LIMIT:
        raise RequestError(f"max tiles must be in [{spec.min_tiles}, {MAX_TILES_LIMIT}]; got {top}")
    grid = GRID_RULES[spec.rule](width, height, spec.tile_size, candidate_grids(spec.min_tiles, top))
    return TilePlan(grid, spec.use_thumbnail and grid[0] * grid[1] != 1, spec.tokens_per_tile)


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im, dtype=np.uint8))  # (H, W, 3) uint8


@functools.cache
def _resize_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanovl-resize")


def make_tiles(image: Image.Image, spec: TileSpec, plan: TilePlan) -> torch.Tensor:
    """RGB image -> (tiles, 3, tile, tile) float32: [0, 1], or normalised when the spec says so.

    The two resizes dominate and Pillow releases the GIL while resizing, so the thumbnail is made
    on a second thread while this one makes the grid."""
    if spec.resize == "torch":
        return _make_tiles_torch(image, spec, plan)
    t, (cols, rows) = spec.tile_size, plan.grid
    thumb = _resize_pool().submit(image.resize, (t, t), Image.Resampling.BICUBIC) if plan.thumbnail else None
    resized = _to_tensor(image.resize((cols * t, rows * t), Image.Resampling.BICUBIC))
    tiles = resized.view(rows, t, cols, t, 3).permute(0, 2, 4, 1, 3).reshape(rows * cols, 3, t, t)
    if thumb is not None:
        tiles = torch.cat([tiles, _to_tensor(thumb.result()).permute(2, 0, 1)[None]])
    x = tiles.float().div_(255)
    if spec.mean is not None:
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        x = x.sub_(mean).div_(std)
    return x


def _make_tiles_torch(image: Image.Image, spec: TileSpec, plan: TilePlan) -> torch.Tensor:
    """The 12B V2 processor: resize in torch (bicubic, antialias, align_corners=False) on 0-255 floats,
    then divide by 255."""
    t, (cols, rows) = spec.tile_size, plan.grid
    x = _to_tensor(image).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    resize = lambda size: torch.nn.functional.interpolate(  # noqa: E731
        x, size=size, mode="bicubic", align_corners=False, antialias=True
    )
    grid = resize((rows * t, cols * t))[0]  # (3, rows*t, cols*t)
    tiles = grid.view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
    if plan.thumbnail:
        tiles = torch.cat([tiles, resize((t, t))])
    x = tiles.div_(255)
    if spec.mean is not None:
        x = x.sub_(torch.tensor(spec.mean).view(1, 3, 1, 1)).div_(torch.tensor(spec.std).view(1, 3, 1, 1))
    return x


def draw_grid(image: Image.Image, plan: TilePlan, color=(230, 30, 30)) -> Image.Image:
    """The page with the tile grid drawn over it (the grid as it falls on the original image)."""
    from PIL import ImageDraw

    out = image.copy()
    draw = ImageDraw.Draw(out)
    cols, rows = plan.grid
    w, h = out.size
    width = max(2, round(min(w, h) / 300))
    for c in range(1, cols):
        draw.line([(c * w / cols, 0), (c * w / cols, h)], fill=color, width=width)
    for r in range(1, rows):
        draw.line([(0, r * h / rows), (w, r * h / rows)], fill=color, width=width)
    draw.rectangle([0, 0, w - 1, h - 1], outline=color, width=width)
    return out
