"""olmOCR-Bench's checks on converted pages (`nanovl eval olmocr-bench`), written from the rules of its
olmocr/bench/tests.py and benchmark.py (allenai/olmocr, Apache-2.0; read at commit dc802aa).

- Tests come from the benchmark's JSONL files, one per category; each line has `pdf`, `page`, `id`,
  `type` and the fields of its type. A PDF with no baseline test gets one (page 1), as benchmark.py
  adds it, in a group of its own.
- Types: present / absent (rapidfuzz partial_ratio of the normalised text against a threshold of
  1 - max_diffs / len, with the length guard of the current benchmark), order (approximate matches of
  `before` and `after` within max_diffs edits; some `before` starting before some `after`), table (a
  cell found in a Markdown or HTML table, with its neighbours up / down / left / right and its top and
  left headings matching: rowspan / colspan laid out on a grid), baseline (some alphanumeric text, no
  trailing n-gram repeated over 30 times, no CJK or emoji; or at most max_length characters on a
  blank page), math (passes when an equation of the page is the same string; anything else needs a
  KaTeX renderer, which nanovl does not ship, so it is skipped and counted). Other types (format,
  footnote) are skipped and counted.
- Scores: a test passes or fails; a category's score is its pass rate, the overall score the mean of
  the categories' (benchmark.py), and the per-type rates beside them. Skipped tests are left out of
  both and reported.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from rapidfuzz import fuzz
from rapidfuzz.distance import Levenshtein

from nanovl.errors import DataError

REPLACEMENTS = {"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"',
                "\uff3f": "_", "\u2013": "-", "\u2014": "-", "\u2011": "-", "\u2012": "-", "\u2212": "-",
                "\u00b5": "\u03bc"}  # fmt: skip
DISALLOWED = re.compile("[\u4e00-\u9fff\u3040-\u309f\u30a0-\u30ff\U0001f600-\U0001f64f\U0001f300-\U0001f5ff"
                        "\U0001f680-\U0001f6ff\U0001f1e0-\U0001f1ff]")  # fmt: skip
TYPES = ("present", "absent", "order", "table", "baseline", "math")


def normalize(text: str | None) -> str:
    """The benchmark's text normalisation: <br> as a space, bold / italic markers and <b>/<i> tags
    dropped, whitespace runs as one space, NFC, typographic quotes and dashes as ASCII."""
    if text is None:
        return ""
    text = re.sub(r"<br/?>", " ", text)
    text = re.sub(r"\*\*(.*?)\*\*", r"\1", text)
    text = re.sub(r"__(.*?)__", r"\1", text)
    text = re.sub(r"</?b>", "", text)
    text = re.sub(r"</?i>", "", text)
    text = re.sub(r"(\*\*|__)(.*?)\1", r"\2", text)
    text = re.sub(r"(\*|_)(.*?)\1", r"\2", text)
    text = re.sub(r"\s+", " ", text)
    text = unicodedata.normalize("NFC", text)
    for fancy, plain in REPLACEMENTS.items():
        text = text.replace(fancy, plain)
    return text


def near_starts(needle: str, hay: str, max_edits: int) -> list[int]:
    """Start positions of substrings of `hay` within `max_edits` (Levenshtein) of `needle`."""
    if max_edits == 0:
        return [m.start() for m in re.finditer(re.escape(needle), hay)] if needle else []
    starts = []
    for size in range(max(1, len(needle) - max_edits), len(needle) + max_edits + 1):
        for i in range(0, len(hay) - size + 1):
            if Levenshtein.distance(needle, hay[i : i + size], score_cutoff=max_edits) <= max_edits:
                starts.append(i)
    return sorted(set(starts))


# ---------------------------------------------------------------------------------------------- tables


@dataclass
class Table:
    """A table as a grid: cell id (row, col of its top-left) -> text, the heading cells, and for each
    cell the cells next to it in four directions and its headings above and to the left."""

    text: dict
    relations: dict  # direction -> {cell: set of cells}


def build_table(rows: list[list[dict]]) -> Table | None:
    """rows: per row, its cells {"text", "rowspan", "colspan", "heading"} in order."""
    text, heading, meta, grid, carry = {}, set(), {}, [], []  # carry[col]: (cell, rows still to span)
    for r, cells in enumerate(rows):
        line, col, k = [], 0, 0
        while k < len(cells) or col < len(carry):
            if col < len(carry) and carry[col] is not None:
                cell, left = carry[col]
                line.append(cell)
                carry[col] = (cell, left - 1) if left > 1 else None
                col += 1
                continue
            if k >= len(cells):
                line.append(None)
                col += 1
                continue
            spec = cells[k]
            k += 1
            cid, rs, cs = (r, col), max(1, spec["rowspan"]), max(1, spec["colspan"])
            text[cid], meta[cid] = spec["text"], (r, col, rs, cs)
            if spec["heading"]:
                heading.add(cid)
            carry += [None] * max(0, col + cs - len(carry))
            for c in range(col, col + cs):
                line.append(cid)
                carry[c] = (cid, rs - 1) if rs > 1 else None
            col += cs
        grid.append(line)
    while any(x is not None for x in carry):  # rowspans past the last row
        line = []
        for c, x in enumerate(carry):
            line.append(x[0] if x else None)
            carry[c] = (x[0], x[1] - 1) if x and x[1] > 1 else None
        grid.append(line)
    if not text:
        return None
    width = max((c for line in grid for c, x in enumerate(line) if x is not None), default=-1) + 1
    grid = [(line + [None] * width)[:width] for line in grid]
    height = len(grid)
    rel = {d: {cid: set() for cid in text} for d in ("up", "down", "left", "right", "top_heading", "left_heading")}
    for cid, (r0, c0, rs, cs) in meta.items():
        r1, c1 = r0 + rs - 1, c0 + cs - 1
        for r in range(r0, r1 + 1):
            for cols, d in ((range(c1 + 1, width), "right"), (range(c0 - 1, -1, -1), "left")):
                n = next((grid[r][c] for c in cols if grid[r][c] not in (None, cid)), None)
                if n is not None:
                    rel[d][cid].add(n)
            seen = {grid[r][c] for c in range(c0 - 1, -1, -1)} - {None, cid}
            rel["left_heading"][cid] |= seen & heading
        for c in range(c0, c1 + 1):
            for rows_, d in ((range(r1 + 1, height), "down"), (range(r0 - 1, -1, -1), "up")):
                n = next((grid[r][c] for r in rows_ if grid[r][c] not in (None, cid)), None)
                if n is not None:
                    rel[d][cid].add(n)
            seen = {grid[r][c] for r in range(r0 - 1, -1, -1)} - {None, cid}
            rel["top_heading"][cid] |= seen & heading
    return Table(text, rel)


def markdown_tables(content: str) -> list[Table]:
    """Runs of 2+ lines holding a `|`; separator rows dropped; the first row and column are headings."""
    tables, run = [], []
    for line in [*content.strip().split("\n"), ""]:
        if "|" in line:
            run.append(line)
            continue
        if len(run) >= 2:
            rows = []
            for row in run:
                if row.strip() and all(c in "- :|" for c in row):
                    continue
                cells = [c.strip() for c in row.split("|")]
                cells = cells[1:] if cells and cells[0] == "" else cells
                cells = cells[:-1] if cells and cells[-1] == "" else cells
                if cells:
                    rows.append(cells)
            specs = [[{"text": t, "rowspan": 1, "colspan": 1, "heading": r == 0 or c == 0} for c, t in enumerate(row)]
                     for r, row in enumerate(rows)]  # fmt: skip
            if (t := build_table(specs)) is not None:
                tables.append(t)
        run = []
    return tables


class _Tables(HTMLParser):
    """<table>s of HTML: rows of cells with their text, spans, and whether they are headings."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables, self.stack = [], []  # stack: the open tables, each {"rows", "row", "cell", "thead"}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.stack.append({"rows": [], "row": None, "cell": None, "thead": False})
        elif not self.stack:
            return
        t = self.stack[-1]
        if tag == "thead":
            t["thead"] = True
        elif tag == "tr":
            t["row"] = []
            t["rows"].append(t["row"])
        elif tag in ("td", "th"):
            if t["row"] is None:
                t["row"] = []
                t["rows"].append(t["row"])
            t["cell"] = {"text": [], "rowspan": span(a.get("rowspan")), "colspan": span(a.get("colspan")),
                         "heading": tag == "th" or t["thead"]}  # fmt: skip
            t["row"].append(t["cell"])
        elif tag == "br" and t["cell"] is not None:
            t["cell"]["text"].append("\n")

    def handle_endtag(self, tag):
        if not self.stack:
            return
        t = self.stack[-1]
        if tag in ("td", "th"):
            t["cell"] = None
        elif tag == "thead":
            t["thead"] = False
        elif tag == "table":
            self.stack.pop()
            rows = [[{**c, "text": "".join(c["text"]).strip()} for c in row] for row in t["rows"]]
            if rows and (table := build_table(rows)) is not None:
                self.tables.append(table)

    def handle_data(self, data):
        if self.stack and self.stack[-1]["cell"] is not None:
            self.stack[-1]["cell"]["text"].append(data)


def span(value) -> int:
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return 1


def html_tables(content: str) -> list[Table]:
    p = _Tables()
    p.feed(content)
    p.close()
    return p.tables


# ----------------------------------------------------------------------------------------------- tests


@dataclass
class BenchTest:
    pdf: str
    page: int
    id: str
    type: str
    group: str  # the JSONL file it came from (its category)
    fields: dict = field(default_factory=dict)

    def get(self, key, default=None):
        return self.fields.get(key, default)

    def run(self, md: str) -> tuple[bool | None, str]:
        """(passed, why); passed None: skipped (why says so)."""
        return getattr(self, "_" + self.type, self._unsupported)(md)

    def _unsupported(self, md):
        return None, f"test type {self.type!r} is not implemented by nanovl's checker"

    def _present(self, md):
        return self._presence(md, present=True)

    def _absent(self, md):
        return self._presence(md, present=False)

    def _presence(self, md, present: bool):
        query, content = normalize(self.get("text")), normalize(md)
        if not self.get("case_sensitive", True):
            query, content = query.lower(), content.lower()
        first, last = self.get("first_n"), self.get("last_n")
        if first and last:
            content = content[:first] + content[-last:]
        elif first:
            content = content[:first]
        elif last:
            content = content[-last:]
        diffs = self.get("max_diffs", 0)
        if len(content) < len(query) - diffs:  # too short to hold it (partial_ratio would be fooled)
            return (False, "the page is too short to contain the text") if present else (True, "")
        threshold = 1.0 - diffs / (len(query) or 1)
        ratio = fuzz.partial_ratio(query, content) / 100.0
        if present:
            return ratio >= threshold, "" if ratio >= threshold else f"best match {ratio:.3f} < {threshold:.3f}"
        return ratio < threshold, "" if ratio < threshold else f"found (match {ratio:.3f} >= {threshold:.3f})"

    def _order(self, md):
        content, diffs = normalize(md), self.get("max_diffs", 0)
        before = near_starts(normalize(self.get("before")), content, diffs)
        after = near_starts(normalize(self.get("after")), content, diffs)
        if not before or not after:
            return False, f"{'before' if not before else 'after'} text not found"
        return (min(before) < max(after)), "" if min(before) < max(after) else "before does not come before after"

    def _table(self, md):
        diffs = self.get("max_diffs", 0)
        target = normalize(self.get("cell", ""))
        tables = ([] if self.get("ignore_markdown_tables") else markdown_tables(md)) + html_tables(md)
        if not tables:
            return False, "no tables found"
        want = {d: normalize(self.get(d, "")) for d in ("up", "down", "left", "right", "top_heading", "left_heading")}
        for t in tables:
            cells = {cid: normalize(s) for cid, s in t.text.items()}
            threshold = max(0.5, 1.0 - diffs / (len(target) or 1))
            for cid, s in cells.items():
                if fuzz.ratio(target, s) / 100.0 < threshold:
                    continue
                ok = True
                for d, expected in want.items():
                    if not expected:
                        continue
                    need = max(0.5, 1.0 - diffs / (len(expected) or 1))
                    if not any(fuzz.ratio(expected, cells[n]) / 100.0 >= need for n in t.relations[d][cid]):
                        ok = False
                        break
                if ok:
                    return True, ""
        return False, f"no cell {target!r} with the expected neighbours"

    def _baseline(self, md):
        alnum = len("".join(c for c in md if c.isalnum()).strip())
        if self.get("max_length") is not None:
            content = re.sub(r"!\[.*?\]\(.*?\)", "", md) if self.get("max_length_skips_image_alt_tags") else md
            n = len("".join(c for c in content if c.isalnum()).strip())
            return n <= self.get("max_length"), "" if n <= self.get("max_length") else f"{n} characters on a blank page"
        if alnum == 0:
            return False, "no alphanumeric characters"
        text = re.sub(r"\s+", " ", md)
        for size in range(1, 6):  # trailing n-grams (n <= 5) repeated more than max_repeats times
            target, count, pos = text[-size:], 0, len(text) - size
            while pos >= 0 and text[pos : pos + size] == target:
                count, pos = count + 1, pos - size
            if count > self.get("max_repeats", 30):
                return False, f"ends with {count} repeats of a {size}-gram"
        if self.get("check_disallowed_characters", True) and DISALLOWED.search(md):
            return False, "CJK or emoji characters"
        return True, ""

    def _math(self, md):
        patterns = [r"\\\((.+?)\\\)", r"\\\[(.+?)\\\]"]
        if not self.get("ignore_dollar_delimited"):
            patterns += [r"\$\$(.+?)\$\$", r"\$(.+?)\$"]
        equations, rest = [], md
        for pattern in patterns:
            equations += [e.strip() for e in re.findall(pattern, rest, re.S)]
            rest = re.sub(pattern, "", rest, flags=re.S)
        if any(e == self.get("math") for e in equations):
            return True, ""
        return None, "no equation is the same string; comparing renders needs KaTeX (not installed): skipped"


def load_tests(data: Path) -> list[BenchTest]:
    """Every test of the JSONL files in `data`, plus a baseline test for each PDF that has none."""
    files = sorted(data.glob("*.jsonl"))
    if not files:
        raise DataError(f"{data}: no olmOCR-Bench test files (*.jsonl)")
    tests, seen = [], set()
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                t = BenchTest(str(d.pop("pdf")), int(d.pop("page")), str(d.pop("id")), str(d.pop("type")), f.stem, d)
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{f}:{n}: not an olmOCR-Bench test ({e})") from None
            if not t.pdf or not t.id or t.id in seen:
                raise DataError(f"{f}:{n}: a test needs a pdf and a unique id")
            for key in {"present": ["text"], "absent": ["text"], "order": ["before", "after"], "table": ["cell"],
                        "math": ["math"]}.get(t.type, []):  # fmt: skip
                if not str(t.get(key, "")).strip():
                    raise DataError(f"{f}:{n}: a {t.type} test needs {key!r}")
            seen.add(t.id)
            tests.append(t)
    for pdf in sorted({t.pdf for t in tests} - {t.pdf for t in tests if t.type == "baseline"}):
        tests.append(BenchTest(pdf, 1, f"{pdf}_baseline", "baseline", "baseline"))
    return tests


def score(tests: list[BenchTest], pages: dict[tuple[str, int], str | None]) -> dict:
    """pages: (pdf, page) -> its Markdown (None: missing, every test on it fails)."""
    results = []
    for t in tests:
        md = pages.get((t.pdf, t.page))
        passed, why = (False, "no converted page") if md is None else t.run(md)
        results.append({"id": t.id, "pdf": t.pdf, "page": t.page, "type": t.type, "group": t.group,
                        "passed": passed, "why": why})  # fmt: skip

    def rate(rows):
        counted = [r for r in rows if r["passed"] is not None]
        return {"score": 100.0 * sum(r["passed"] for r in counted) / len(counted) if counted else None,
                "tests": len(counted), "skipped": len(rows) - len(counted)}  # fmt: skip

    groups = {g: rate([r for r in results if r["group"] == g]) for g in sorted({r["group"] for r in results})}
    types = {k: rate([r for r in results if r["type"] == k]) for k in sorted({r["type"] for r in results})}
    scored = [g["score"] for g in groups.values() if g["score"] is not None]
    return {"overall": sum(scored) / len(scored) if scored else None, "categories": groups, "types": types,
            "results": results}  # fmt: skip


def pdf_path(data: Path, pdf: str) -> Path | None:
    """Where a test's PDF is: DATA/pdfs/PDF (the distributed layout) or DATA/PDF."""
    for p in (data / "pdfs" / pdf, data / pdf):
        if p.is_file():
            return p
    return None


def md_name(pdf: str, page: int) -> str:
    """benchmark.py's file name for a converted page: {pdf stem}_pg{page}_repeat1.md."""
    return f"{pdf[:-4] if pdf.lower().endswith('.pdf') else pdf}_pg{page}_repeat1.md"


def read_pages(tests: list[BenchTest], folder: Path) -> dict:
    """Converted pages made elsewhere, named as benchmark.py expects (the first repeat)."""
    pages = {}
    for pdf, page in {(t.pdf, t.page) for t in tests}:
        f = folder / md_name(pdf, page)
        pages[(pdf, page)] = f.read_text(encoding="utf-8") if f.is_file() else None
    return pages


def convert_pages(tests: list[BenchTest], data: Path, backend, out: Path, max_tokens: int, progress=None) -> dict:
    """Convert every page a test is about (once; a page already in OUT/md is kept: reruns resume)."""
    from nanovl.documents.convert import PROMPT
    from nanovl.processor import scan_media

    folder = out / "md"
    folder.mkdir(parents=True, exist_ok=True)
    pages = {}
    for pdf, page in sorted({(t.pdf, t.page) for t in tests}):
        f = folder / md_name(pdf, page)
        if not f.is_file():
            src = pdf_path(data, pdf)
            if src is None:
                pages[(pdf, page)] = None
                continue
            try:
                answer = backend.complete(scan_media([src], str(page)), PROMPT, max_tokens)
            except Exception as e:  # noqa: BLE001 - a page that fails is a missing page, its tests fail
                (out / "errors.txt").open("a").write(f"{pdf} page {page}: {e}\n")
                pages[(pdf, page)] = None
                continue
            f.write_text(answer.text.strip() + "\n", encoding="utf-8")
        pages[(pdf, page)] = f.read_text(encoding="utf-8")
        if progress is not None:
            progress(1)
    return pages


def table(summary: dict) -> str:
    """The summary as olmOCR-Bench's README shows it: a row of category scores and the overall."""
    cats = summary["categories"]
    head = "| " + " | ".join([*cats, "overall"]) + " |"
    cell = lambda s: "-" if s is None else f"{s:.1f}"  # noqa: E731
    row = "| " + " | ".join([*(cell(c["score"]) for c in cats.values()), cell(summary["overall"])]) + " |"
    lines = [head, "|" + "---|" * (len(cats) + 1), row, "", "| type | score | tests | skipped |"]
    lines.append("|---|---:|---:|---:|")
    lines += [f"| {k} | {cell(v['score'])} | {v['tests']} | {v['skipped']} |" for k, v in summary["types"].items()]
    return "\n".join(lines)
