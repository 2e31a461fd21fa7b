"""`nanovl convert`: Markdown into blocks and sanitised HTML, page markers, page-by-page output
through the CLI with a tiny random model, and failures that keep what was done."""

import io
import json
from pathlib import Path

import pypdfium2 as pdfium
import pytest

from nanovl.cli import main
from nanovl.documents.convert import PageResult, Writer, blocks, to_html

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
MULTI = CORPUS / "docling" / "multi_page.pdf"

PAGE = """# Annual report

Revenue grew in **2023**.

- North
- South
  - nested, not an item of the outer list

1. first
2. second

| Region | Sales |
|---|---|
| North | 1,200 |
| South | 950 |

$$E = mc^2$$

<table><tr><td rowspan="2">merged</td><td>a</td></tr><tr><td>b</td></tr></table>

```python
print("code")
```

> a quote
"""


def test_blocks_of_a_hand_written_page():
    got = blocks(PAGE)
    assert [b["type"] for b in got] == ["heading", "paragraph", "list", "list", "table", "math", "table", "code",
                                        "quote"]  # fmt: skip
    assert got[0] == {"type": "heading", "level": 1, "text": "Annual report"}
    assert got[1]["text"] == "Revenue grew in **2023**."
    assert got[2] == {"type": "list", "ordered": False, "items": ["North", "South"]}
    assert got[3] == {"type": "list", "ordered": True, "items": ["first", "second"]}
    assert got[4]["rows"] == [["Region", "Sales"], ["North", "1,200"], ["South", "950"]]
    assert got[5] == {"type": "math", "latex": "E = mc^2"}
    assert 'rowspan="2"' in got[6]["html"]
    assert got[7] == {"type": "code", "info": "python", "text": 'print("code")\n'}
    assert got[8]["text"] == "a quote"


def test_html_is_sanitised_and_keeps_tables():
    hostile = '<script>alert(1)</script>\n\n<img src=x onerror="alert(2)">\n\n<a href="javascript:alert(3)">y</a>\n'
    out = to_html(PAGE + "\n\n" + hostile)
    assert "<h1>Annual report</h1>" in out and "<table>" in out and 'rowspan="2"' in out
    assert "<script" not in out and "alert(1)" not in out and "onerror" not in out and "href" not in out
    assert '<img src="x">' in out and ">y</a>" in out  # what is harmless stays


@pytest.mark.parametrize("fmt", ["markdown", "html", "json"])
def test_writer_marks_every_page(fmt):
    out = io.StringIO()
    w = Writer(out, fmt, "doc.pdf")
    for n in (2, 3):
        w.page(PageResult(n, f"# Page {n}\n\ntext {n}", "stop", blocks(f"# Page {n}\n\ntext {n}")))
    w.close()
    text = out.getvalue()
    if fmt == "markdown":
        assert text == "<!-- page 2 -->\n\n# Page 2\n\ntext 2\n\n\n<!-- page 3 -->\n\n# Page 3\n\ntext 3\n"
    elif fmt == "html":
        assert text.count("<section") == 2 and '<section data-page="3">\n<h1>Page 3</h1>' in text
    else:
        doc = json.loads(text)
        assert doc["document"] == "doc.pdf" and [p["page"] for p in doc["pages"]] == [2, 3]
        assert doc["pages"][1]["blocks"][0] == {"type": "heading", "level": 1, "text": "Page 3"}


@pytest.mark.skipif(not MULTI.is_file(), reason=f"the shared corpus is not at {CORPUS}")
def test_cli_converts_page_by_page(tiny_v1, tmp_path, capsys):
    pages = len(pdfium.PdfDocument(MULTI))
    base = ["convert", "--model", str(tiny_v1), "--max-tokens", "8", "--dpi", "36"]
    assert main([*base, str(MULTI)]) == 0
    md = capsys.readouterr().out
    assert [line for line in md.splitlines() if line.startswith("<!-- page")] == [
        f"<!-- page {n} -->" for n in range(1, pages + 1)
    ]
    assert main([*base, str(MULTI), "--pages", "2,4", "--to", "json", "--out", str(tmp_path / "one.json")]) == 0
    doc = json.loads((tmp_path / "one.json").read_text())
    assert [p["page"] for p in doc["pages"]] == [2, 4] and all(p["finish_reason"] for p in doc["pages"])
    # several documents into a folder; a broken one fails alone, leaving no output file behind
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 broken")
    image = CORPUS / "sroie" / "sroie_000.jpg"
    rc = main([*base, str(tmp_path / "broken.pdf"), str(image), "--to", "html", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot open PDF" in err and "1 of 2 document(s) failed" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sroie_000.html"]
    assert main([*base, str(MULTI), str(image)]) == 1
    assert "needs --out DIR" in capsys.readouterr().err
    assert main([*base, str(MULTI), "--to", "docx"]) == 1
