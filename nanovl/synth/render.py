"""Drawing primitives for synthetic documents: a page that records every string it draws.

- Each drawn string becomes a `TextItem` (text, position, font, colour, bounding box), and strings
  drawn as one visual line form a `Line`; the page's transcription is its lines in drawing order,
  so the ground truth is what was drawn, not a second copy kept by hand.
- Fonts: DejaVu or Liberation TrueType files when the system has them, else Pillow's bundled
  scalable font, which every Pillow with FreeType carries. The font list is part of the output
  (`fonts_available()`), so a run on a machine with other fonts is visibly different.
- `degrade` spoils a finished page (blur, noise, a small rotation, JPEG artefacts) and returns the
  rotation it applied, so positions on the clean page can follow the pixels (`rotate_points`); the
  clean page is kept for checking the ground truth against pixels.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation")
FONT_NAMES = {
    "regular": ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansCondensed.ttf", "LiberationSans-Regular.ttf"),
    "bold": ("DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "LiberationSans-Bold.ttf"),
    "mono": ("DejaVuSansMono.ttf", "LiberationMono-Regular.ttf"),
}


@cache
def fonts_available() -> dict[str, tuple[str, ...]]:
    """style -> font file paths found on this machine ("" = Pillow's bundled font)."""
    found = {}
    for style, names in FONT_NAMES.items():
        paths = [str(Path(d) / n) for n in names for d in FONT_DIRS if (Path(d) / n).is_file()]
        found[style] = tuple(paths) or ("",)
    return found


@cache
def font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)


@dataclass
class TextItem:
    text: str
    xy: tuple[int, int]
    font: tuple[str, int]  # (file, size)
    fill: tuple[int, int, int]
    bbox: tuple[int, int, int, int]

    def glyphs(self) -> list[tuple[float, float, str]]:
        """(x, y, character) for each character, spaces included: the middle of its advance, at the
        string's vertical middle."""
        f, (x, _), y = font(*self.font), self.xy, (self.bbox[1] + self.bbox[3]) / 2
        edges = [x + f.getlength(self.text[:i]) for i in range(len(self.text) + 1)]
        return [((edges[i] + edges[i + 1]) / 2, y, c) for i, c in enumerate(self.text)]

    def chars(self) -> list[tuple[float, float, str]]:
        """`glyphs` without the spaces."""
        return [g for g in self.glyphs() if not g[2].isspace()]


@dataclass
class Line:
    items: list[TextItem]
    sep: str = " "

    @property
    def text(self) -> str:
        return self.sep.join(i.text for i in self.items)


@dataclass
class Page:
    """A white (or tinted) page; `write` draws strings as one line and records them."""

    width: int
    height: int
    bg: tuple[int, int, int] = (255, 255, 255)
    lines: list[Line] = field(default_factory=list)

    def __post_init__(self):
        self.image = Image.new("RGB", (self.width, self.height), self.bg)
        self.draw = ImageDraw.Draw(self.image)

    def write(self, parts: list[tuple[int, str]], y: int, face: tuple[str, int], fill=(20, 20, 20), sep=" ") -> int:
        """Draw each (x, text) of one visual line at height y; returns the line's bottom edge. A part
        that would run past the page's right edge moves left, and one that would touch the previous
        part moves right (so strings never overlap; a line too long for the page is cut)."""
        f = font(*face)
        items = []
        for x, text in parts:
            x = max(0, min(x, self.width - 4 - math.ceil(f.getlength(text))))
            if items:
                x = max(x, items[-1].bbox[2] + 12)
            self.draw.text((x, y), text, font=f, fill=fill)
            items.append(TextItem(text, (x, y), face, fill, self.draw.textbbox((x, y), text, font=f)))
        self.lines.append(Line(items, sep))
        return max(i.bbox[3] for i in items)

    def text_width(self, text: str, face: tuple[str, int]) -> int:
        return int(self.draw.textlength(text, font=font(*face)))

    @property
    def transcription(self) -> str:
        return "\n".join(line.text for line in self.lines)

    @property
    def items(self) -> list[TextItem]:
        return [i for line in self.lines for i in line.items]


def item_matches(page: Image.Image, item: TextItem, bg) -> bool:
    """Whether the page shows exactly `item` inside its box: the string drawn alone on the same
    background, at the same place with the same font, gives the same pixels there (and some ink)."""
    alone = Image.new("RGB", page.size, bg)
    ImageDraw.Draw(alone).text(item.xy, item.text, font=font(*item.font), fill=item.fill)
    box = tuple(int(v) for v in item.bbox)
    a, b = alone.crop(box), page.crop(box)
    inked = a.getextrema() != tuple((c, c) for c in bg)
    return inked and a.tobytes() == b.tobytes()


def rotate_points(points, angle: float, size: tuple[int, int]):
    """(x, y, ...) page positions -> where `Image.rotate(angle)` (about the centre, no expand) moves them."""
    a, cx, cy = math.radians(angle), size[0] / 2, size[1] / 2
    cos, sin = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * cos + (y - cy) * sin, cy - (x - cx) * sin + (y - cy) * cos, *rest)
            for x, y, *rest in points]  # fmt: skip


def degrade(im: Image.Image, rng: random.Random, strength: float = 1.0) -> tuple[Image.Image, float]:
    """Scanner/phone-like degradation -> (page, the rotation it applied in degrees, counter-clockwise);
    strength 0 returns the page unchanged (and 0.0)."""
    angle = 0.0
    if strength <= 0:
        return im, angle
    if rng.random() < 0.5 * strength:
        angle = rng.uniform(-1.5, 1.5) * strength
        im = im.rotate(angle, resample=Image.BICUBIC, expand=False, fillcolor=im.getpixel((0, 0)))
    if rng.random() < 0.4 * strength:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    if rng.random() < 0.5 * strength:  # zero-mean grey noise, the same on the three channels
        g = np.random.default_rng(rng.getrandbits(32))
        noise = g.normal(0, rng.uniform(2, 8) * strength, (im.height, im.width, 1))
        im = Image.fromarray((np.asarray(im, np.float32) + noise).clip(0, 255).astype(np.uint8))
    if rng.random() < 0.6 * strength:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=rng.randint(45, 90))
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return im, angle
