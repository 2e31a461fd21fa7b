"""Synthetic documents as digital PDFs: every drawn string is real text in the PDF (`nanovl synth --pdf`).

A page of the PDF is the clean page (before degradation) at 1 pixel = 1 point: the page's graphics
(rules, bars, tints) as a background image with the strings painted out, and each string written
over it with fpdf2 in the font file and size it was drawn with, its baseline where Pillow drew it.
So pypdfium2 extracts exactly the drawn strings, at the boxes the ground truth records.

`pdf_truth` gives the record written beside each file: the fields, and for each field every box
where a string equal to its value was drawn ([page, x0, y0, x1, y1], top-left origin, points).
"""

from __future__ import annotations

from pathlib import Path

from PIL import ImageDraw

from nanovl.errors import NanovlError
from nanovl.synth.kinds import Doc
from nanovl.synth.render import font


def _fpdf():
    try:
        from fpdf import FPDF
    except ImportError:
        raise NanovlError("writing synthetic PDFs needs fpdf2: pip install fpdf2 (or the 'dev' extra)") from None
    return FPDF


def write_pdf(doc: Doc, path: str | Path) -> None:
    FPDF = _fpdf()
    pdf = FPDF(unit="pt")
    pdf.set_auto_page_break(False)
    pdf.set_creator("nanovl synth")
    families: dict[str, str] = {}
    for page in doc.clean:
        pdf.add_page(format=(page.width, page.height))
        background = page.image.copy()
        paint = ImageDraw.Draw(background)
        for item in page.items:
            paint.rectangle(item.bbox, fill=page.bg)
        pdf.image(background, x=0, y=0, w=page.width, h=page.height)
        for item in page.items:
            path_, size = item.font
            if not path_:
                raise NanovlError("synthetic PDFs need a TrueType font (DejaVu or Liberation); none was found")
            family = families.setdefault(path_, f"f{len(families)}")
            if family not in pdf.fonts:
                pdf.add_font(family, fname=path_)
            pdf.set_font(family, size=size)
            pdf.set_text_color(*item.fill)
            ascent = font(path_, size).getmetrics()[0]  # Pillow draws from the ascender line down
            pdf.text(item.xy[0], item.xy[1] + ascent, item.text)
    pdf.output(str(path))


def pdf_truth(doc: Doc) -> dict:
    """{"fields", "boxes": {field: [[page, x0, y0, x1, y1], ...]}}: the boxes where the field's value
    was drawn, as one string (a field's value may be drawn more than once, or not alone)."""
    boxes: dict[str, list] = {}
    for name, value in doc.fields.items():
        boxes[name] = [
            [n + 1, *item.bbox] for n, page in enumerate(doc.clean) for item in page.items if item.text == str(value)
        ]
    return {"fields": doc.fields, "boxes": boxes}
