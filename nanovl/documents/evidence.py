"""Evidence: where an extracted value stands on the page, found in the document's own text.

Never a box the model drew: a value is looked up in the PDF's text layer (pypdfium2, one box per
character), and the evidence is the union of the boxes of the characters it matched.

- Coordinates: page coordinates with the origin at the page's top-left corner and y growing
  downwards, like the rendered image: PDF points (1/72 inch) for PDF pages, pixels for images.
- Matching, in order: the value as written; for numbers and amounts, the ways a page prints them
  (`1234.5` -> `1,234.50`, `1.234,50`, `1234.50`, ...), matched only between non-digits; for ISO dates,
  the usual day / month / year orders and month names (English, German, French, Spanish, Italian,
  Dutch); then, for strings of 4 characters or more, the best fuzzy match (rapidfuzz alignment, score
  >= 90), which for values that are mostly digits must hold the same digits (fuzzy on OCR noise in
  names and addresses, never on a date or an amount). Case, runs of whitespace and typographic
  quotes are normalised first; values with digits are also matched with every space taken out of
  both sides ("August 3 , 2014", "FR 604 219 388 61").
- Pages with no text layer (scans, images): words from tesseract when `pytesseract` and the
  `tesseract` binary are installed (optional, never required); otherwise no evidence, with the reason.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from functools import cached_property

FUZZY_MIN_SCORE = 90.0
FUZZY_MIN_LEN = 4
MONTHS = {  # month names a page may print, per language; index 0 = January
    "en": "january february march april may june july august september october november december",
    "de": "januar februar märz april mai juni juli august september oktober november dezember",
    "fr": "janvier février mars avril mai juin juillet août septembre octobre novembre décembre",
    "es": "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre diciembre",
    "it": "gennaio febbraio marzo aprile maggio giugno luglio agosto settembre ottobre novembre dicembre",
    "nl": "januari februari maart april mei juni juli augustus september oktober november december",
}
QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " "})
NUMBER = re.compile(r"^\s*[^\d\s-]{0,3}\s*(-?[\d.,' ]*\d)\s*[^\d\s]{0,3}\s*$")  # "$1,234.50", "34,73 EUR"


@dataclass
class PageText:
    """The text of one page, one box per character (None for spaces and generated line breaks)."""

    page: int  # 1-based page number in the document
    text: str
    boxes: list[tuple[float, float, float, float] | None]  # (x0, y0, x1, y1), top-left origin
    source: str  # "text-layer" | "ocr"

    @cached_property
    def normalised(self) -> tuple[str, list[int]]:
        return normalise(self.text)

    @cached_property
    def squeezed(self) -> tuple[str, list[int]]:
        """Without any whitespace: finds "August 3 , 2014" and "FR 604 219 388 61" as printed."""
        return normalise(self.text, spaces=False)


def pdf_text(data: bytes, pages: list[int]) -> list[PageText | None]:
    """The text layer of the given 0-based pages of a PDF; None for a page without one."""
    from nanovl.media import PDFIUM_LOCK

    with PDFIUM_LOCK:
        return _pdf_text(data, pages)


def _pdf_text(data: bytes, pages: list[int]) -> list[PageText | None]:
    import pypdfium2 as pdfium
    import pypdfium2.raw as raw

    doc = pdfium.PdfDocument(data)
    out = []
    try:
        for i in pages:
            page = doc[i]
            height = page.get_size()[1]
            tp = page.get_textpage()
            chars, boxes = [], []
            for j in range(tp.count_chars()):
                c = chr(raw.FPDFText_GetUnicode(tp.raw, j) or 32)
                generated = raw.FPDFText_IsGenerated(tp.raw, j) == 1
                chars.append(c)
                if c.isspace() or generated:
                    boxes.append(None)
                else:
                    left, bottom, right, top = tp.get_charbox(j)
                    boxes.append((left, height - top, right, height - bottom))
            tp.close()
            page.close()  # a loaded page holds its content until closed
            text = "".join(chars)
            out.append(PageText(i + 1, text, boxes, "text-layer") if text.strip() else None)
        return out
    finally:
        doc.close()


def ocr_available() -> str | None:
    """None when tesseract can be used, else why not."""
    try:
        import pytesseract
    except ImportError:
        return "no OCR engine: install tesseract (e.g. apt-get install tesseract-ocr) and pytesseract"
    try:
        pytesseract.get_tesseract_version()
    except Exception:  # pytesseract raises its own TesseractNotFoundError, or OSError
        return "no OCR engine: pytesseract is installed but the tesseract binary is not"
    return None


def ocr_text(image, page: int) -> PageText:
    """Words from tesseract, each word's box given to each of its characters."""
    import pytesseract

    d = pytesseract.image_to_data(image, output_type=pytesseract.Output.DICT)
    chars: list[str] = []
    boxes: list = []
    for word, x, y, w, h in zip(d["text"], d["left"], d["top"], d["width"], d["height"]):
        if not word.strip():
            continue
        if chars:
            chars.append(" ")
            boxes.append(None)
        chars += list(word)
        boxes += [(float(x), float(y), float(x + w), float(y + h))] * len(word)
    return PageText(page, "".join(chars), boxes, "ocr")


def normalise(text: str, spaces: bool = True) -> tuple[str, list[int]]:
    """Casefolded text with whitespace runs as one space (spaces=False: none at all), and for each
    of its characters the index of the character it came from."""
    out, where = [], []
    for i, c in enumerate(text.translate(QUOTES)):
        if c.isspace():
            if spaces and out and out[-1] != " ":
                out.append(" ")
                where.append(i)
            continue
        for f in c.casefold():
            out.append(f)
            where.append(i)
    return "".join(out), where


def number_forms(value: float) -> list[str]:
    """The ways a page prints this number: with and without thousands separators, point or comma
    decimals, and without decimals for whole numbers."""
    forms = []
    for decimals in (2, 1, 0, 3) if value == int(value) else (2, 1, 3, 4):
        if decimals == 0 and value != int(value):
            continue
        s = f"{value:,.{decimals}f}"  # 1,234.50
        forms += [s, s.replace(",", ""), s.replace(",", "#").replace(".", ",").replace("#", "."),
                  s.replace(",", "").replace(".", ","), s.replace(",", " "), s.replace(",", "'")]  # fmt: skip
    if value == int(value):
        forms.append(str(int(value)))
    return list(dict.fromkeys(f for f in forms if f))


def as_number(value) -> float | None:
    """A number, or a string that prints one ("$1,234.50", "34,73 EUR") -> its value; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    m = NUMBER.match(value) if isinstance(value, str) else None
    if not m or not any(c.isdigit() for c in m.group(1)):
        return None
    s = m.group(1).replace(" ", "").replace("'", "")
    if "," in s and "." in s:  # the later one is the decimal mark
        s = s.replace(",", "") if s.rfind(".") > s.rfind(",") else s.replace(".", "").replace(",", ".")
    elif s.count(",") == 1 and len(s.split(",")[1]) != 3:
        s = s.replace(",", ".")  # a decimal comma: 34,73
    else:
        s = s.replace(",", "")
        if s.count(".") > 1:
            s = s.replace(".", "")
    try:
        return float(s)
    except ValueError:
        return None


def date_forms(value: str) -> list[str]:
    """An ISO date (2014-05-07) -> the ways a page prints it; [] for anything else."""
    try:
        d = dt.date.fromisoformat(value.strip())
    except ValueError:
        return []
    day, month, year = d.day, d.month, d.year
    forms = [f"{day:02d}.{month:02d}.{year}", f"{day}.{month}.{year}", f"{month:02d}/{day:02d}/{year}",
             f"{day:02d}/{month:02d}/{year}", f"{month}/{day}/{year}", f"{day}/{month}/{year}",
             f"{day:02d}-{month:02d}-{year}", f"{year}/{month:02d}/{day:02d}", f"{d.isoformat()}",
             f"{day:02d}.{month:02d}.{year % 100:02d}", f"{month:02d}/{day:02d}/{year % 100:02d}"]  # fmt: skip
    for names in MONTHS.values():
        name = names.split()[month - 1]
        for n in (name, name[:3]):
            forms += [f"{n} {day}, {year}", f"{n} {day:02d}, {year}", f"{day} {n} {year}", f"{day:02d} {n} {year}",
                      f"{day}. {n} {year}", f"{n} {day} {year}"]  # fmt: skip
    return list(dict.fromkeys(forms))


def _digit_edge(hay: str, i: int, step: int) -> bool:
    """Whether hay[i] continues a number: a digit, or a separator with a digit beyond it."""
    if not 0 <= i < len(hay):
        return False
    if hay[i].isdigit():
        return True
    return hay[i] in ".," and 0 <= i + step < len(hay) and hay[i + step].isdigit()


def _exact(needle: str, hay: str, numeric: bool):
    """(start, end) of the first match of `needle` in `hay`; a number only where it is not part of a
    longer one (4.11 is not found inside 14.115 or 4.115)."""
    start = 0
    while (i := hay.find(needle, start)) >= 0:
        j = i + len(needle)
        if not numeric or not (_digit_edge(hay, i - 1, -1) or _digit_edge(hay, j, 1)):
            return i, j
        start = i + 1
    return None


def _evidence(page: PageText, where: list[int], i: int, j: int, how: str, score=None) -> dict | None:
    """The evidence of normalised characters [i, j) of a page (`where`: their source indices): the
    union of their boxes and the page's own text there."""
    a, b = where[i], where[j - 1] + 1
    boxes = [box for box in page.boxes[a:b] if box is not None]
    if not boxes:
        return None
    bbox = [round(min(x[0] for x in boxes), 2), round(min(x[1] for x in boxes), 2),
            round(max(x[2] for x in boxes), 2), round(max(x[3] for x in boxes), 2)]  # fmt: skip
    found = {"page": page.page, "bbox": bbox, "text": page.text[a:b], "source": page.source, "match": how}
    if score is not None:
        found["score"] = round(score, 1)
    return found


def _fuzzy(needle: str, hay: str):
    """(score, start, end) of the best fuzzy match of `needle` in `hay`: rapidfuzz's alignment finds the
    place, then its edges move by up to 3 characters to the span whose plain ratio (which counts a
    length difference, unlike partial_ratio: a page shorter than the value is not a match) is highest;
    None under FUZZY_MIN_SCORE."""
    from rapidfuzz import fuzz

    m = fuzz.partial_ratio_alignment(needle, hay, score_cutoff=FUZZY_MIN_SCORE)
    if m is None or m.dest_end <= m.dest_start:
        return None
    best = (0.0, m.dest_start, m.dest_end)
    for a in range(max(m.dest_start - 3, 0), m.dest_start + 4):
        for b in range(max(m.dest_end - 3, a + 1), min(m.dest_end + 4, len(hay) + 1)):
            score = fuzz.ratio(needle, hay[a:b])
            if score > best[0]:
                best = (score, a, b)
    return best if best[0] >= FUZZY_MIN_SCORE else None


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def _mostly_digits(text: str) -> bool:
    """Half or more of the non-space characters are digits (dates, amounts, numbers, ids)."""
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(c.isdigit() for c in chars) * 2 >= len(chars)


def locate(value, pages: list[PageText | None]) -> dict | None:
    """Where `value` stands on these pages: {"page", "bbox", "text", "source", "match"}, or None."""
    if value is None or isinstance(value, bool) or not pages:
        return None
    text = value if isinstance(value, str) else repr(value)
    needle = normalise(text)[0].strip()
    if not needle:
        return None
    number = as_number(value)
    candidates = [(needle, number is not None, "exact")]
    if number is not None:
        candidates += [(normalise(f)[0], True, "number") for f in number_forms(number)]
    if isinstance(value, str):
        candidates += [(normalise(f)[0], True, "date") for f in date_forms(value)]
    for squeeze in (False, True):
        for form, numeric, how in candidates:
            if squeeze:  # only where digits are: "US D" (in "US Dollars") is not "USD"
                if not any(c.isdigit() for c in form):
                    continue
                form = form.replace(" ", "")
            for page in pages:
                if page is None:
                    continue
                hay, where = page.squeezed if squeeze else page.normalised
                if (span := _exact(form, hay, numeric)) and (found := _evidence(page, where, *span, how)):
                    return found
    if not isinstance(value, str) or number is not None or len(needle) < FUZZY_MIN_LEN:
        return None
    best = None
    for page in pages:
        if page is None or not (m := _fuzzy(needle, page.normalised[0])):
            continue
        if _mostly_digits(needle) and _digits(page.normalised[0][m[1] : m[2]]) != _digits(needle):
            continue  # 25/12/2018 is not 24/12/2018, however close the strings
        if best is None or m[0] > best[0]:
            best = (*m, page)
    if best is None:
        return None
    score, a, b, page = best
    return _evidence(page, page.normalised[1], a, b, "fuzzy", score)
