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
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nanovl.errors import NanovlError

MAX_PIXELS = 100_000_000  # 100 MP: a 600-DPI A3 page fits; a decompression bomb does not
DEFAULT_DPI = 144


class MediaError(NanovlError):
    """An input file that cannot be read as an image or document."""


def read_source(src, what: str = "input") -> tuple[bytes, str]:
    """Bytes and a display name from a path, bytes, a data: URL or a base64 string."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), f"<{what} bytes>"
    if isinstance(src, Path) or (isinstance(src, str) and not src.startswith("data:") and len(src) < 4096):
        path = Path(src)
        if path.is_file():
            return path.read_bytes(), str(path)
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


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Pillow's own bomb check still refuses anything over 2 x Image.MAX_IMAGE_PIXELS (179 MP) at open;
    its warning below that is silenced, since `max_pixels` is enforced here instead."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise MediaError(f"{name}: not an image or PDF that nanovl can read") from None
    except Image.DecompressionBombError as e:
        raise MediaError(f"{name}: refused as a decompression bomb ({e})") from None
    w, h = im.size
    if w * h > max_pixels:
        raise MediaError(
            f"{name}: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the limit of {max_pixels / 1e6:.0f} MP "
            "(decompression-bomb guard)"
        )
    if w == 0 or h == 0:
        raise MediaError(f"{name}: empty image ({w}x{h})")
    try:
        im.seek(0)  # first frame of GIF / APNG / multi-page TIFF
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{name}: corrupt or truncated image ({e})") from None


def parse_pages(spec: str | None, count: int) -> list[int]:
    """ "1-3,7" -> [0, 1, 2, 6] (0-based), checked against the page count; None -> every page."""
    if spec is None or spec.strip() in ("", "all"):
        return list(range(count))
    pages: list[int] = []
    for part in spec.split(","):
        part = part.strip()
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


def load_pdf(data: bytes, name: str, pages: str | None = None, dpi: float = DEFAULT_DPI, max_pixels=MAX_PIXELS):
    import pypdfium2 as pdfium

    try:
        doc = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        reason = "it is encrypted (password-protected)" if "password" in str(e).lower() else str(e)
        raise MediaError(f"{name}: cannot open PDF: {reason}") from None
    try:
        images = []
        for i in parse_pages(pages, len(doc)):
            page = doc[i]
            w, h = page.get_size()
            scale = dpi / 72.0
            if w * scale * h * scale > max_pixels:
                raise MediaError(
                    f"{name} page {i + 1}: {w * scale:.0f}x{h * scale:.0f} at {dpi} DPI exceeds "
                    f"the limit of {max_pixels / 1e6:.0f} MP; lower the DPI"
                )
            images.append(to_rgb(page.render(scale=scale).to_pil()))
        return images
    finally:
        doc.close()


def load_document(src, pages: str | None = None, dpi: float = DEFAULT_DPI, max_pixels: int = MAX_PIXELS):
    """An image or a PDF -> a list of RGB images (one per selected page)."""
    if isinstance(src, Image.Image):
        return [load_image(src, max_pixels)]
    data, name = read_source(src, "document")
    if not data:
        raise MediaError(f"{name}: empty file")
    if is_pdf(data):
        return load_pdf(data, name, pages, dpi, max_pixels)
    parse_pages(pages, 1)  # an image is a one-page document: "1" selects it, "2" is out of range
    return [decode_image(data, name, max_pixels)]


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
