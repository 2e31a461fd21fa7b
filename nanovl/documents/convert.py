"""Conversion: documents to Markdown, HTML or JSON blocks, one page at a time (`nanovl convert`).

- Each page is rendered, sent to the model alone and written out before the next is rendered, so
  memory stays flat in the document's length and a long run keeps what it finished.
- The model writes Markdown (the prompt asks for reading order, headings, lists, Markdown tables or
  HTML tables where cells merge, LaTeX formulas). markdown-it-py parses it: into blocks for JSON, into
  HTML (sanitised by nh3, since the text comes from a model reading an untrusted document).
- Pages are marked: `<!-- page N -->` lines in Markdown, `<section data-page="N">` in HTML, a
  `page` number per entry in JSON.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from nanovl.errors import NanovlError
from nanovl.media import DEFAULT_DPI

FORMATS = ("markdown", "html", "json")
SUFFIX = {"markdown": ".md", "html": ".html", "json": ".json"}
PROMPT = (
    "Convert this page to Markdown, in reading order. Use # headings, - or 1. lists, Markdown tables "
    "(an HTML <table> where cells span rows or columns) and LaTeX for formulas ($...$ inline, $$...$$ "
    "on their own line). Write only the page's content."
)
MATH = re.compile(r"^\s*\$\$(.+)\$\$\s*$", re.S)


@dataclass
class PageResult:
    page: int  # 1-based, in the document
    markdown: str
    finish_reason: str | None
    blocks: list[dict] = field(default_factory=list)


def _markdown_it():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable("table")


def blocks(markdown: str) -> list[dict]:
    """Markdown -> its top-level blocks: heading (level, text), paragraph (text), math (latex),
    list (ordered, items), table (rows, or html), code (text, info), quote (text), html (html)."""
    tokens = _markdown_it().parse(markdown)
    out: list[dict] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t.level != 0 or t.type.endswith("_close") or t.type == "hr":
            i += 1
            continue
        end = i
        if t.nesting == 1:  # find the matching close at level 0
            end = next(j for j in range(i + 1, len(tokens)) if tokens[j].level == 0 and tokens[j].nesting == -1)
        inner = tokens[i : end + 1]
        inline = [x.content for x in inner if x.type == "inline"]
        if t.type == "heading_open":
            out.append({"type": "heading", "level": int(t.tag[1]), "text": inline[0] if inline else ""})
        elif t.type == "paragraph_open":
            text = inline[0] if inline else ""
            m = MATH.match(text)
            out.append({"type": "math", "latex": m.group(1).strip()} if m else {"type": "paragraph", "text": text})
        elif t.type in ("bullet_list_open", "ordered_list_open"):
            items, depth = [], 0
            for x in inner[1:-1]:
                depth += x.nesting if x.type == "list_item_open" or x.type == "list_item_close" else 0
                if x.type == "inline" and depth == 1:
                    items.append(x.content)
            out.append({"type": "list", "ordered": t.type == "ordered_list_open", "items": items})
        elif t.type == "table_open":
            rows, row = [], None
            for x in inner:
                if x.type == "tr_open":
                    row = []
                elif x.type == "inline" and row is not None:
                    row.append(x.content)
                elif x.type == "tr_close":
                    rows.append(row)
                    row = None
            out.append({"type": "table", "rows": rows})
        elif t.type in ("fence", "code_block"):
            if t.info.strip() in ("math", "latex"):
                out.append({"type": "math", "latex": t.content.strip()})
            else:
                out.append({"type": "code", "info": t.info.strip(), "text": t.content})
        elif t.type == "blockquote_open":
            out.append({"type": "quote", "text": "\n".join(inline)})
        elif t.type == "html_block":
            kind = "table" if "<table" in t.content.lower() else "html"
            out.append({"type": kind, "html": t.content.strip()})
        i = end + 1
    return out


def to_html(markdown: str) -> str:
    """Markdown -> sanitised HTML (nh3's default allow-list keeps tables with colspan / rowspan)."""
    import nh3

    return nh3.clean(_markdown_it().render(markdown))


def convert_pages(backend, src, pages: str | None = None, dpi: float = DEFAULT_DPI, max_tokens: int = 2048,
                  prompt: str = PROMPT, max_tiles=None) -> Iterator[PageResult]:  # fmt: skip
    """The pages of one document, converted one by one (each rendered only when its turn comes)."""
    from nanovl.processor import scan_media

    media = scan_media([src], pages, dpi)  # headers only: nothing is rendered yet
    for k, page in enumerate(media):
        answer = backend.complete([page], prompt, max_tokens, None, max_tiles)
        text = answer.text.strip()
        yield PageResult(page_number(page, k), text, answer.finish_reason, blocks(text))


def page_number(page, k: int) -> int:
    """The page's number in its document (scan_pdf names pages "NAME page N"), else its position."""
    m = re.search(r" page (\d+)$", getattr(page, "name", ""))
    return int(m.group(1)) if m else k + 1


class Writer:
    """Writes one document's converted pages as they come, in one of FORMATS."""

    def __init__(self, out, fmt: str, name: str):
        if fmt not in FORMATS:
            raise NanovlError(f"--to must be one of {', '.join(FORMATS)}, not {fmt!r}")
        self.out, self.fmt, self.name, self.count = out, fmt, name, 0
        if fmt == "html":
            title = html.escape(name)
            out.write(f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{title}</title></head><body>\n')
        elif fmt == "json":
            out.write(json.dumps({"document": name})[:-1] + ', "pages": [\n')

    def page(self, r: PageResult):
        if self.fmt == "markdown":
            self.out.write(("\n\n" if self.count else "") + f"<!-- page {r.page} -->\n\n{r.markdown}\n")
        elif self.fmt == "html":
            self.out.write(f'<section data-page="{r.page}">\n{to_html(r.markdown)}</section>\n')
        else:
            entry = {"page": r.page, "blocks": r.blocks, "markdown": r.markdown, "finish_reason": r.finish_reason}
            self.out.write(("," if self.count else "") + json.dumps(entry, ensure_ascii=False) + "\n")
        self.count += 1
        self.out.flush()

    def close(self):
        if self.fmt == "html":
            self.out.write("</body></html>\n")
        elif self.fmt == "json":
            self.out.write("]}\n")
        self.out.flush()
