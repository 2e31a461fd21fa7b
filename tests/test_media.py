"""Images and PDFs in: formats, modes, sources, and every kind of bad input with a clear error."""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from nanovl.media import MediaError, load_document, load_image, parse_pages


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF"])
def test_formats(fmt):
    im = Image.new("RGB", (40, 30), (200, 30, 30))
    out = load_image(encode(im, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)
    assert abs(int(out.getpixel((20, 15))[0]) - 200) < 12


def test_gif_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue()).getpixel((5, 5))[0] > 200


def test_transparency_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 0, 255))
    out = load_image(encode(rgba, "PNG"))
    assert out.getpixel((4, 4)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 0)
    la = Image.new("LA", (4, 4), (0, 0))
    assert load_image(encode(la, "PNG")).getpixel((1, 1)) == (255, 255, 255)
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    p.putpixel((1, 1), 1)
    out = load_image(encode(p, "PNG", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (10, 200, 10)


def test_cmyk_grayscale_and_16_bit():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
    r, g, b = load_image(encode(cmyk, "JPEG")).getpixel((2, 2))
    assert r > 200 and g < 60 and b < 60
    assert load_image(encode(Image.new("L", (4, 4), 100), "PNG")).getpixel((1, 1)) == (100, 100, 100)
    assert load_image(encode(Image.new("1", (4, 4), 1), "PNG")).getpixel((1, 1)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))  # mid-grey in 16 bits
    assert sixteen.mode.startswith("I;16")
    assert abs(load_image(encode(sixteen, "PNG")).getpixel((1, 1))[0] - 128) <= 1  # not clipped to 255


def test_exif_orientation_applied():
    im = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    assert load_image(encode(im, "JPEG", exif=exif)).size == (20, 40)


def test_sources(tmp_path):
    data = encode(Image.new("RGB", (6, 6), (1, 2, 3)), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    b64 = base64.b64encode(data).decode()
    for src in [tmp_path / "a.png", str(tmp_path / "a.png"), data, b64, "data:image/png;base64," + b64]:
        assert load_image(src).size == (6, 6)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: what a decompression bomb looks like before decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "data, pattern",
    [
        (png_header_only(40000, 40000), "decompression bomb"),  # over Pillow's own guard
        (png_header_only(12000, 12000), "144 MP exceeds the limit of 100 MP"),  # over nanovl's
        (encode(Image.new("RGB", (64, 64), (9, 9, 9)), "PNG")[:80], "corrupt or truncated"),
        (b"this is a text file, not an image", "not an image or PDF"),
        (b"", "empty file"),
    ],
    ids=["bomb", "large", "truncated", "not-an-image", "empty"],
)
def test_bad_images(data, pattern):
    with pytest.raises(MediaError, match=pattern):
        load_document(data)


def test_missing_file_and_bad_strings(tmp_path):
    with pytest.raises(MediaError, match="no such file"):
        load_image(str(tmp_path / "nope.png"))
    with pytest.raises(MediaError, match="base64"):
        load_image("data:image/png,notbase64")


def make_pdf(path, pages: int, encrypt: str | None = None):
    from reportlab.lib.pagesizes import letter
    from reportlab.lib.pdfencrypt import StandardEncryption
    from reportlab.pdfgen import canvas

    enc = StandardEncryption(encrypt, canPrint=0) if encrypt else None
    c = canvas.Canvas(str(path), pagesize=letter, encrypt=enc)
    for i in range(pages):
        c.drawString(72, 720, f"Page {i + 1}: total 42.00")
        c.showPage()
    c.save()
    return path


def test_pdf_pages_and_dpi(tmp_path):
    pdf = make_pdf(tmp_path / "doc.pdf", 4)
    pages = load_document(pdf, dpi=72)
    assert len(pages) == 4 and pages[0].size == (612, 792)
    assert [p.size for p in load_document(pdf, pages="2-3", dpi=144)] == [(1224, 1584)] * 2
    assert len(load_document(pdf, pages="1,3-4", dpi=36)) == 3


def test_pdf_errors(tmp_path):
    pdf = make_pdf(tmp_path / "doc.pdf", 2)
    with pytest.raises(MediaError, match="page 5 is out of range: the document has 2 pages"):
        load_document(pdf, pages="1,5")
    with pytest.raises(MediaError, match="encrypted"):
        load_document(make_pdf(tmp_path / "locked.pdf", 1, encrypt="secret"))
    broken = pdf.read_bytes()[:300]
    with pytest.raises(MediaError, match="cannot open PDF"):
        load_document(broken)
    with pytest.raises(MediaError, match="exceeds the limit"):
        load_document(pdf, dpi=72 * 40)


@pytest.mark.parametrize(
    "spec, want", [("1-3,7", [0, 1, 2, 6]), ("2", [1]), ("5-", [4, 5, 6, 7]), (None, list(range(8)))]
)
def test_parse_pages(spec, want):
    assert parse_pages(spec, 8) == want


@pytest.mark.parametrize("spec", ["0", "3-2", "x", "1-9"])
def test_parse_pages_errors(spec):
    with pytest.raises(MediaError):
        parse_pages(spec, 8)


@pytest.mark.parametrize("spec", ["1,,2", "1,", ",2"])
def test_empty_page_range_items_are_refused(tmp_path, spec):
    pdf = make_pdf(tmp_path / "doc.pdf", 2)
    with pytest.raises(MediaError, match="empty item"):
        load_document(pdf, pages=spec)


def test_bad_files_and_settings_are_one_line_errors(tmp_path):
    with pytest.raises(MediaError, match="is a folder"):
        load_document(tmp_path)
    with pytest.raises(MediaError, match="above 0"):
        load_document(make_pdf(tmp_path / "d.pdf", 1), dpi=0)
    lying = make_pdf(tmp_path / "one.pdf", 1).read_bytes().replace(b"/Count 1", b"/Count 3")
    with pytest.raises(MediaError, match="page 2: cannot read"):
        load_document(lying)
    for n in (20, 60, 100, 200):  # truncated at every depth of the header: Pillow raises at open
        with pytest.raises(MediaError, match="corrupt or truncated|not an image"):
            load_document(encode(Image.effect_mandelbrot((300, 200), (-2, -1, 1, 1), 30).convert("RGB"), "PNG")[:n])


def test_pages_are_sized_before_they_are_rendered(tmp_path, monkeypatch):
    from nanovl import media

    rendered = []
    real = media._render
    monkeypatch.setattr(media, "_render", lambda *a: rendered.append(a[2]) or real(*a))
    pages = media.scan_document(make_pdf(tmp_path / "d.pdf", 3), dpi=72)
    assert [p.size for p in pages] == [(612, 792)] * 3 and rendered == []
    assert pages[1].load().size == (612, 792) and rendered == [1]
    with pytest.raises(MediaError, match="3 pages selected, more than the 2 allowed"):
        media.scan_document(make_pdf(tmp_path / "d.pdf", 3), max_pages=2)
    photo = Image.new("RGB", (40, 30))
    exif = photo.getexif()
    exif[0x0112] = 6  # rotated: the decoded image is 30 x 40
    buf = io.BytesIO()
    photo.save(buf, "JPEG", exif=exif)
    (page,) = media.scan_document(buf.getvalue())
    assert page.size == (30, 40) == page.load().size


def test_pdf_pages_render_from_several_threads(monkeypatch):
    """PDFium is not thread-safe: the server and batch jobs render in threads, so every pypdfium2
    call holds one lock (without it, opening PDFs concurrently failed with "Data format error")."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from nanovl.media import scan_document

    corpus = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
    pdfs = sorted(corpus.glob("*/*.pdf"))
    if not pdfs:
        pytest.skip(f"the shared corpus is not at {corpus}")

    def work(path):
        return [p.load().size for p in scan_document(path, dpi=36)]

    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(work, pdfs * 3))
    assert len(sizes) == len(pdfs) * 3 and all(s and s[0][0] > 0 for s in sizes)
