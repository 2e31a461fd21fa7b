"""The olmOCR-Bench checker on hand-written Markdown whose pass / fail is known: the corpus's own test
files (tables, presence, absence), and each test type on small cases, with the scoring rules."""

import json
from pathlib import Path

import pytest

from nanovl.cli import main
from nanovl.errors import DataError
from nanovl.eval.olmocr import BenchTest, load_tests, md_name, score

OLMOCR = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "olmocr"
needs_corpus = pytest.mark.skipif(not OLMOCR.is_dir(), reason=f"the shared corpus is not at {OLMOCR}")

# Written to satisfy the corpus's olmo2-pg4 tests: a caption, and a table in which 3.32T sits between
# 3.71T and 21.32T under "Words", 11.8B between 12.2B and 3.7B, arXiv under "Source", 47.2B under
# "Bytes", and "Math proofs code" in the row headed "Algebraic Stack".
OLMO2 = """Table 1 Composition of the pretraining data for OLMo 2.

| Source | Type | Bytes | Words | Tokens |
|---|---|---|---|---|
| DCLM | Web pages | 3.71T | 3.32T | 21.32T |
| arXiv | STEM papers | 47.2B | 12.2B | 20.8B |
| Algebraic Stack | Math proofs code | 45.2B | 11.8B | 12.6B |
| pes2o | Papers | 9.9B | 3.7B | 2.1B |
"""
# The same with the Bytes and Words headers swapped: exactly table05 (3.32T under "Words") and
# table07 (47.2B under "Bytes") must fail.
OLMO2_SWAPPED = OLMO2.replace("| Bytes | Words |", "| Words | Bytes |")

# For earnings.pdf: an HTML table (thead headings, a rowspan) where 1,136 is under "Year Ended",
# 680 below 1,892, and 2,532 in the row headed (a <th>) "Research and development"; no "62" anywhere.
EARNINGS = """# Consolidated statements

<table>
<thead><tr><th></th><th colspan="2">Year Ended</th></tr></thead>
<tr><td>Revenue</td><td>1,136</td><td>1,892</td></tr>
<tr><th rowspan="2">Research and development</th><td>2,532</td><td>680</td></tr>
<tr><td>1,001</td><td>905</td></tr>
</table>
"""


def write_pages(folder: Path, pages: dict[tuple[str, int], str]):
    folder.mkdir(parents=True, exist_ok=True)
    for (pdf, page), md in pages.items():
        (folder / md_name(pdf, page)).write_text(md)


@needs_corpus
def test_corpus_tests_on_hand_written_pages(tmp_path):
    tests = [t for t in load_tests(OLMOCR) if t.pdf in ("olmo2-pg4.pdf", "earnings.pdf")]
    assert {t.type for t in tests} == {"table", "present", "absent", "baseline"}

    def results(pages):
        return {r["id"]: r["passed"] for r in score(tests, pages)["results"]}

    good = results({("olmo2-pg4.pdf", 1): OLMO2, ("earnings.pdf", 1): EARNINGS})
    assert all(good.values()), {k: v for k, v in good.items() if not v}
    swapped = results({("olmo2-pg4.pdf", 1): OLMO2_SWAPPED, ("earnings.pdf", 1): EARNINGS + "\nTotal 1,620\n"})
    failed = {k for k, v in swapped.items() if not v}
    assert failed == {"olmo2-pg4_table05", "olmo2-pg4_table07", "earnings_table04"}
    missing = results({("olmo2-pg4.pdf", 1): OLMO2})  # earnings' page was never converted
    assert not any(v for k, v in missing.items() if k.startswith("earnings"))


@needs_corpus
def test_eval_score_olmocr_bench_cli(tmp_path, capsys):
    pages = tmp_path / "md"
    write_pages(pages, {("olmo2-pg4.pdf", 1): OLMO2_SWAPPED, ("earnings.pdf", 1): EARNINGS})
    out = tmp_path / "out"
    args = ["eval", "score", "olmocr-bench", "--data", str(OLMOCR), "--predictions", str(pages), "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    cats = summary["categories"]
    assert cats["olmo2-pg4.olmocr_bench_tests"]["score"] == pytest.approx(80.0)  # 8 of 10
    assert cats["earnings.olmocr_bench_tests"]["score"] == pytest.approx(100.0)
    assert cats["lincoln_letter.olmocr_bench_tests"]["score"] == 0.0  # no page: every test fails
    # the baseline group: 5 PDFs, 2 with pages that pass
    assert cats["baseline"]["score"] == pytest.approx(40.0)
    assert summary["overall"] == pytest.approx(sum(c["score"] for c in cats.values()) / len(cats))
    assert "| overall |" in capsys.readouterr().out
    assert len((out / "results.jsonl").read_text().splitlines()) == 31


def t(type_, **fields):
    return BenchTest("doc.pdf", 1, f"t-{type_}", type_, "g", fields)


def test_presence_and_absence():
    md = "The **quick** brown fox\njumps  over\u2014the lazy dog."
    assert t("present", text="quick brown fox").run(md)[0]
    assert t("present", text="brown fox jumps over-the lazy").run(md)[0]  # bold, spaces, dash normalised
    assert not t("present", text="brown fax").run(md)[0]
    assert t("present", text="brown fax", max_diffs=1).run(md)[0]
    assert not t("present", text="QUICK").run(md)[0] and t("present", text="QUICK", case_sensitive=False).run(md)[0]
    assert (
        not t("present", text="lazy dog", first_n=20).run(md)[0] and t("present", text="lazy dog", last_n=12).run(md)[0]
    )
    assert not t("present", text="a long phrase").run(" ")[0]  # too short to contain it: no false pass
    assert t("absent", text="cat").run(md)[0] and not t("absent", text="lazy").run(md)[0]


def test_order():
    md = "First the title. Then the body. Finally the footer."
    assert t("order", before="the title", after="the footer").run(md)[0]
    assert not t("order", before="the footer", after="the title").run(md)[0]
    assert not t("order", before="the titel", after="the footer").run(md)[0]
    assert t("order", before="the titel", after="the footer", max_diffs=2).run(md)[0]
    assert not t("order", before="missing", after="the footer").run(md)[0]


def test_tables_with_spans_and_headings():
    html = """<table><thead><tr><th>Region</th><th colspan="2">Sales</th></tr></thead>
    <tr><td rowspan="2">North</td><td>10</td><td>20</td></tr><tr><td>30</td><td>40</td></tr></table>"""
    assert t("table", cell="40", up="20", left="30", top_heading="Sales").run(html)[0]
    assert t("table", cell="30", left="North", left_heading="").run(html)[0]  # North spans both rows
    assert t("table", cell="10", top_heading="Sales", left="North").run(html)[0]
    assert not t("table", cell="30", left_heading="North").run(html)[0]  # a td is not a heading
    assert not t("table", cell="10", right="40").run(html)[0] and not t("table", cell="99").run(html)[0]
    md = "| a | b |\n|---|---|\n| c | d |\n"
    assert t("table", cell="d", top_heading="b", left_heading="c", up="b").run(md)[0]
    assert not t("table", cell="d", ignore_markdown_tables=True).run(md)[0]
    assert not t("table", cell="d").run("no table here")[0]


def test_baseline_math_and_unknown_types():
    assert t("baseline").run("Some text 123")[0]
    assert not t("baseline").run("  \n ** ")[0]
    assert not t("baseline").run("ok " + "ab" * 40)[0]  # a 2-gram repeated 40 times at the end
    assert t("baseline").run("ok " + "ab" * 20)[0]
    assert (
        not t("baseline").run("text \u4e2d\u6587")[0]
        and t("baseline", check_disallowed_characters=False).run("text \u4e2d\u6587")[0]
    )
    assert t("baseline", max_length=5).run("abc")[0] and not t("baseline", max_length=2).run("abc")[0]
    assert t("math", math="x^2 + y^2").run("where $x^2 + y^2$ holds")[0]
    assert t("math", math="x^2").run("\\[x^2\\]")[0]
    assert t("math", math="x^{2}").run("$x^2$")[0] is None  # needs a renderer: skipped
    assert t("format", text="Title", format="heading").run("# Title")[0] is None
    s = score([t("present", text="a"), t("math", math="q")], {("doc.pdf", 1): "a"})
    assert s["categories"]["g"] == {"score": 100.0, "tests": 1, "skipped": 1} and s["overall"] == 100.0


def test_bad_test_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"pdf": "x.pdf", "page": 1, "id": "1", "type": "present", "text": "t"}\n{oops\n')
    with pytest.raises(DataError, match="a.jsonl:2"):
        load_tests(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"pdf": "x.pdf", "page": 1, "id": "1", "type": "table"}\n')
    with pytest.raises(DataError, match="needs 'cell'"):
        load_tests(tmp_path)
    with pytest.raises(DataError, match="no olmOCR-Bench test files"):
        load_tests(tmp_path / "empty")


@needs_corpus
def test_eval_olmocr_bench_converts_the_pages_and_resumes(tiny_v1, tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "eval",
        "olmocr-bench",
        "--data",
        str(OLMOCR),
        "--model",
        str(tiny_v1),
        "--max-tokens",
        "4",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    pages = sorted(p.name for p in (out / "md").iterdir())
    assert len(pages) == 7 and "mattsnotes_pg3_repeat1.md" in pages  # every page a test is about
    first = json.loads((out / "summary.json").read_text())
    stamp = {p: (out / "md" / p).stat().st_mtime_ns for p in pages}
    assert main(args) == 0  # a rerun keeps the converted pages and scores the same
    assert {p: (out / "md" / p).stat().st_mtime_ns for p in pages} == stamp
    assert json.loads((out / "summary.json").read_text()) == first
    assert "overall" in capsys.readouterr().out
