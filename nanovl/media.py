"""Documents in: images and PDF pages as RGB PIL images, with limits and one-line errors.

- Sources: a path, raw bytes, a base64 string, a `data:` URL, or a PIL image already open.
- Images: PNG, JPEG, WebP, TIFF, BMP, GIF (first frame) and anything else Pillow reads. EXIF
  orientation is applied. The models take RGB without alpha: transparency (RGBA, LA, P with a
  transparent colour) is composited on white; CMYK, 16-bit and float images are converted with their
  full range mapped to 8 bits (a plain `convert("L")` would clip 16-bit values).
- PDFs through pypdfium2: page selection ("1-3,7"), a render DPI, one image per page. Encrypted and
  broken files are refused with the reason.
- A pixel limit (`max_pixels`, checked from the header before decoding) guards against decompression
  bombs, for images and rendered pages alike.
- `scan_document` reads only headers and page sizes and returns `Page`s that decode or render on
  demand, so a request can be sized (pixels, tiles, tokens) before any page is rendered.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nanovl.errors import NanovlError

# PDFium is not thread-safe: every pypdfium2 call of nanovl holds this lock (the server renders in a
# thread pool; batch jobs keep several pages in flight). Concurrent calls failed as "Data format error".
PDFIUM_LOCK = threading.RLock()
MAX_PIXELS = 100_000_000  # 100 MP: a 600-DPI A3 page fits; a decompression bomb does not
DEFAULT_DPI = 144
# what a malformed file can make Pillow raise while opening or decoding it
DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, TypeError)


class MediaError(NanovlError):
    """An input file that cannot be read as an image or document."""


def read_source(src, what: str = "input") -> tuple[bytes, str]:
    """Bytes and a display name from a path, bytes, a data: URL or a base64 string."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), f"<{what} bytes>"
    if isinstance(src, Path) or (isinstance(src, str) and not src.startswith("data:") and len(src) < 4096):
        path = Path(src)
        try:
            if path.is_file():
                return path.read_bytes(), str(path)
            if path.is_dir():
                raise MediaError(f"{src}: is a folder, not a file")
        except (OSError, ValueError) as e:  # unreadable, or a NUL in the name
            raise MediaError(f"{src}: cannot read ({e})") from None
        if isinstance(src, Path) or "/" in src or "." in src[-6:]:
            raise MediaError(f"{src}: no such file")
    if isinstance(src, str):
        payload = src
        if src.startswith("data:"):
            head, sep, payload = src.partition(",")
            if not sep or ";base64" not in head:
                raise MediaError("data: URLs must be base64-encoded (data:<type>;base64,<data>)")
        try:
            return base64.b64decode(payload, validate=True), f"<{what} base64>"
        except (binascii.Error, ValueError):
            raise MediaError(f"{src[:40]!r}: not a file, a data: URL or base64 data") from None
    raise MediaError(f"cannot read {what} of type {type(src).__name__}")


def is_pdf(data: bytes) -> bool:
    return data[:1024].lstrip().startswith(b"%PDF")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency composited on white."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        lo = 0.0 if im.mode.startswith("I;16") else min(float(a.min()), 0.0)
        im = Image.fromarray(np.clip((a - lo) / (top - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(src, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open one image (first frame of an animation) as RGB, EXIF orientation applied."""
    if isinstance(src, Image.Image):
        return to_rgb(ImageOps.exif_transpose(src))
    data, name = read_source(src, "image")
    return decode_image(data, name, max_pixels)


def open_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Pillow's own bomb check still refuses anything over 2 x Image.MAX_IMAGE_PIXELS (179 MP) at open;
    its warning below that is silenced, since `max_pixels` is enforced here instead. Reads the header
    only: the pixels are decoded by `decode_image`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise MediaError(f"{name}: not an image or PDF that nanovl can read") from None
    except Image.DecompressionBombError as e:
        raise MediaError(f"{name}: refused as a decompression bomb ({e})") from None
    except DECODE_ERRORS as e:
        raise MediaError(f"{name}: corrupt or truncated image ({e})") from None
    w, h = im.size
    if w * h > max_pixels:
        raise MediaError(
            f"{name}: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the limit of {max_pixels / 1e6:.0f} MP "
            "(decompression-bomb guard)"
        )
    if w == 0 or h == 0:
        raise MediaError(f"{name}: empty image ({w}x{h})")
    return im


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS, im: Image.Image | None = None) -> Image.Image:
    """The image's first frame as RGB, EXIF orientation applied (im: `open_image`'s result, if at hand)."""
    im = open_image(data, name, max_pixels) if im is None else im
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.seek(0)  # first frame of GIF / APNG / multi-page TIFF
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    except (*DECODE_ERRORS, Image.DecompressionBombError) as e:
        raise MediaError(f"{name}: corrupt or truncated image ({e})") from None


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """The size after EXIF orientation (rotations by 90 degrees swap the sides), from the header."""
    try:
        turned = im.getexif().get(0x0112) in (5, 6, 7, 8)
    except DECODE_ERRORS:
        turned = False
    return (im.size[1], im.size[0]) if turned else im.size


def parse_pages(spec: str | None, count: int) -> list[int]:
    """ "1-3,7" -> [0, 1, 2, 6] (0-based), checked against the page count; None -> every page."""
    if spec is None or spec.strip() in ("", "all"):
        return list(range(count))
    pages: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise MediaError(f"bad page range {spec!r}: an empty item between commas")
        try:
            lo, sep, hi = part.partition("-")
            first = int(lo) if lo else 1
            last = (int(hi) if hi else count) if sep else first
        except ValueError:
            raise MediaError(f"bad page range {part!r}: use numbers like 1-3,7") from None
        if first < 1 or last < first:
            raise MediaError(f"bad page range {part!r}: pages count from 1")
        if last > count:
            raise MediaError(f"page {last} is out of range: the document has {count} page{'s' * (count != 1)}")
        pages.extend(range(first - 1, last))
    return pages


@dataclass
class Page:
    """An image or a PDF page whose size is known (from headers) and whose pixels come on demand."""

    size: tuple[int, int]  # (width, height) of the RGB image `load` returns
    load: Callable[[], Image.Image]
    name: str


def _open_pdf(data: bytes, name: str):
    import pypdfium2 as pdfium

    try:
        with PDFIUM_LOCK:
            return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        reason = "it is encrypted (password-protected)" if "password" in str(e).lower() else str(e)
        raise MediaError(f"{name}: cannot open PDF: {reason}") from None


def _render(data: bytes, name: str, index: int, scale: float) -> Image.Image:
    import pypdfium2 as pdfium

    with PDFIUM_LOCK:
        doc = _open_pdf(data, name)
        try:
            page = doc[index]
            bitmap = page.render(scale=scale)
            image = to_rgb(bitmap.to_pil()).copy()  # our own pixels: the bitmap is freed here, under the lock
            bitmap.close()
            page.close()
            return image
        except pdfium.PdfiumError as e:
            raise MediaError(f"{name} page {index + 1}: cannot render ({e})") from None
        finally:
            doc.close()


def scan_pdf(data: bytes, name: str, pages: str | None = None, dpi: float = DEFAULT_DPI, max_pixels=MAX_PIXELS,
             max_pages: int | None = None):  # fmt: skip
    """The selected pages of a PDF as `Page`s, sized from the page boxes; nothing is rendered yet.
    max_pages: refuse a selection of more pages than this (checked before any page is read)."""

    if not (isinstance(dpi, (int, float)) and math.isfinite(dpi) and dpi > 0):
        raise MediaError(f"the PDF render resolution must be a number of DPI above 0; got {dpi}")
    scale = dpi / 72.0
    with PDFIUM_LOCK:
        return _scan_pdf(data, name, pages, scale, dpi, max_pixels, max_pages)


def _scan_pdf(data: bytes, name: str, pages, scale: float, dpi: float, max_pixels, max_pages):
    import pypdfium2 as pdfium

    doc = _open_pdf(data, name)
    try:
        out, selected = [], parse_pages(pages, len(doc))
        if max_pages is not None and len(selected) > max_pages:
            raise MediaError(f"{name}: {len(selected)} pages selected, more than the {max_pages} allowed")
        for i in selected:
            try:  # the size without loading the page (a loaded page holds its content: ~0.35 MB each)
                w, h = doc.get_page_size(i)
            except pdfium.PdfiumError as e:  # e.g. a page count that lies
                raise MediaError(f"{name} page {i + 1}: cannot read the page ({e})") from None
            size = (round(w * scale), round(h * scale))
            if size[0] * size[1] > max_pixels:
                raise MediaError(
                    f"{name} page {i + 1}: {size[0]}x{size[1]} at {dpi:g} DPI exceeds "
                    f"the limit of {max_pixels / 1e6:.0f} MP; lower the DPI"
                )
            if min(size) < 1:
                raise MediaError(f"{name} page {i + 1}: empty page ({w:.0f}x{h:.0f} points)")
            out.append(Page(size, lambda i=i: _render(data, name, i, scale), f"{name} page {i + 1}"))
        return out
    finally:
        doc.close()


def load_pdf(data: bytes, name: str, pages: str | None = None, dpi: float = DEFAULT_DPI, max_pixels=MAX_PIXELS):
    return [page.load() for page in scan_pdf(data, name, pages, dpi, max_pixels)]


def scan_document(src, pages: str | None = None, dpi: float = DEFAULT_DPI, max_pixels: int = MAX_PIXELS,
                  max_pages: int | None = None):  # fmt: skip
    """An image or a PDF -> `Page`s (one per selected page), from headers alone."""
    if isinstance(src, Image.Image):
        im = load_image(src, max_pixels)
        return [Page(im.size, lambda: im, "<image>")]
    data, name = read_source(src, "document")
    if not data:
        raise MediaError(f"{name}: empty file")
    if is_pdf(data):
        return scan_pdf(data, name, pages, dpi, max_pixels, max_pages)
    parse_pages(pages, 1)  # an image is a one-page document: "1" selects it, "2" is out of range
    im = open_image(data, name, max_pixels)
    return [Page(oriented_size(im), lambda: decode_image(data, name, max_pixels), name)]


def load_document(src, pages: str | None = None, dpi: float = DEFAULT_DPI, max_pixels: int = MAX_PIXELS):
    """An image or a PDF -> a list of RGB images (one per selected page)."""
    return [page.load() for page in scan_document(src, pages, dpi, max_pixels)]


VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts")
MAX_FRAMES = 64


@dataclass
class Video:
    """Frames sampled from a video, with the time (seconds) each was shown at, when known."""

    frames: list[Image.Image]
    timestamps: list[float] | None
    name: str


def is_video(src) -> bool:
    return isinstance(src, (str, Path)) and str(src).lower().endswith(VIDEO_SUFFIXES)


def sample_times(duration: float, src_fps: float, frames: int | None, fps: float | None, cap: int) -> list[float]:
    """Times to take frames at: `frames` spread evenly from the first to the last frame, or one every
    1/`fps` seconds from 0; never more than `cap` (then spread evenly). Default: 8 frames."""
    last = max(duration - 1.0 / src_fps, 0.0) if src_fps else duration
    if src_fps:  # never more often than the video has frames
        fps = min(fps, src_fps) if fps else None
        frames = min(frames or 8, max(round(duration * src_fps), 1))
    if fps:
        times = [i / fps for i in range(int(last * fps + 1e-9) + 1)]
        if len(times) <= cap:
            return times
        frames = cap
    n = min(frames or 8, cap)
    return [last * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def load_video(
    src, frames: int | None = None, fps: float | None = None, cap: int = MAX_FRAMES, max_pixels: int = MAX_PIXELS
) -> Video:
    """Decode with PyAV and keep, for each sample time, the first frame shown at or after it."""
    try:
        import av
    except ImportError:
        raise MediaError("video input needs PyAV: pip install 'nanovl[video]'") from None
    if frames is not None and frames < 1 or fps is not None and fps <= 0:
        raise MediaError("--frames must be >= 1 and --fps > 0")
    data, name = read_source(src, "video")
    try:
        container = av.open(io.BytesIO(data))
    except (av.FFmpegError, ValueError, OSError) as e:
        raise MediaError(f"{name}: not a video PyAV can read ({e})") from None
    with container:
        if not container.streams.video:
            raise MediaError(f"{name}: the file has no video stream")
        stream = container.streams.video[0]
        src_fps = float(stream.average_rate or 0) or None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1e6
        else:
            duration = 0.0
        wanted = sample_times(duration, src_fps or 0.0, frames, fps, cap)
        picked: list[Image.Image] = []
        times: list[float] = []
        eps = 0.5 / src_fps if src_fps else 1e-3  # a frame shown within half a period counts as on time
        try:
            for frame in container.decode(stream):
                if frame.width * frame.height > max_pixels:
                    raise MediaError(f"{name}: {frame.width}x{frame.height} frames exceed the pixel limit")
                t = float(frame.time) if frame.time is not None else len(times) / (src_fps or 1.0)
                while len(picked) < len(wanted) and t >= wanted[len(picked)] - eps:
                    picked.append(frame.to_image().convert("RGB"))
                    times.append(round(t, 6))
                if len(picked) == len(wanted):
                    break
        except av.FFmpegError as e:
            if not picked:
                raise MediaError(f"{name}: corrupt video ({e})") from None
    if not picked:
        raise MediaError(f"{name}: no decodable frames")
    return Video(picked, times, name)
