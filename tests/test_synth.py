"""Synthetic documents: deterministic per seed, and the ground truth agrees with the pixels.

Each string the generator says it drew is redrawn alone and compared with the clean page's pixels in
its box, so the transcription is what the image shows. Fields, answers and chart values are then
re-derived independently: from the transcription text (parsed here, not by the generator) and, for
charts, from the bar heights and marker positions measured in the image.
"""

import json
import re

import pytest

from nanovl.errors import NanovlError
from nanovl.synth import EVAL_SEED_START, KINDS, make_doc, write_dataset
from nanovl.synth.records import COPY, copy_instruction, text_instruction
from nanovl.synth.render import item_matches

SEEDS = [0, 7, 123]


def cents(text: str) -> int:
    """'$1,234.56' / '1,234.56 EUR' / '€3.10' -> 123456."""
    digits = re.sub(r"[^\d.]", "", text)
    whole, frac = digits.split(".")
    return int(whole) * 100 + int(frac)


def lines(doc):
    return doc.transcription.split("\n")


def value_after(doc, label: str) -> str:
    for ln in lines(doc):
        if ln.startswith(label):
            return ln[len(label) :].strip()
    raise AssertionError(f"no line starting with {label!r}")


def answers(doc) -> dict[str, dict]:
    return {q["question"].split("\n")[0]: q for q in doc.qa}


def check_choice(q, expected):
    assert q["type"] == "choice"
    assert q["choices"][ord(q["answer"]) - 65] == expected
    for i, option in enumerate(q["choices"]):
        assert f"\n{chr(65 + i)}. {option}" in q["question"]


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_per_seed(kind):
    a, b = make_doc(kind, 5), make_doc(kind, 5)
    assert [p.tobytes() for p in a.pages] == [p.tobytes() for p in b.pages]
    assert (a.transcription, a.fields, a.qa) == (b.transcription, b.fields, b.qa)
    c = make_doc(kind, 6)
    assert c.transcription != a.transcription


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_drawn_string_is_on_the_page(kind, seed):
    doc = make_doc(kind, seed)
    for page in doc.clean:
        assert page.items, "a page without text"
        for item in page.items:
            assert item_matches(page.image, item, page.bg), f"{kind}/{seed}: {item.text!r} not drawn as recorded"
    # the delivered page is a degraded copy of the clean one, same size
    assert [p.size for p in doc.pages] == [p.image.size for p in doc.clean]
    for q in doc.qa:
        if q["type"] == "extractive":
            assert q["answer"] in doc.transcription, f"{kind}/{seed}: extractive answer {q['answer']!r} not on the page"


@pytest.mark.parametrize("seed", SEEDS)
def test_invoice_arithmetic(seed):
    doc = make_doc("invoice", seed)
    rows = [ln.split(" | ") for ln in lines(doc) if ln.count(" | ") == 3 and not ln.startswith("Description")]
    for _, qty, unit, amount in rows:
        assert cents(amount) == int(qty) * cents(unit)
    subtotal = sum(cents(r[3]) for r in rows)
    assert cents(value_after(doc, "Subtotal:")) == subtotal
    rate = int(re.search(r"Tax \((\d+)%\)", doc.transcription).group(1))
    tax = cents(re.search(r"Tax \(\d+%\): (.*)", doc.transcription).group(1))
    assert tax == subtotal * rate // 100
    total = value_after(doc, "Total:")
    assert cents(total) == subtotal + tax and doc.fields["total"] == total
    a = answers(doc)
    assert a["What is the total amount?"]["answer"] == total
    assert a["How many line items are on the invoice?"]["answer"] == str(len(rows))
    assert a["What is the total quantity of all items?"]["answer"] == str(sum(int(r[1]) for r in rows))
    assert a["What is the invoice number?"]["answer"] == value_after(doc, "Invoice number:")
    check_choice(a["Which item has the largest amount?"], max(rows, key=lambda r: cents(r[3]))[0])


@pytest.mark.parametrize("seed", SEEDS)
def test_receipt_total(seed):
    doc = make_doc("receipt", seed)
    body = lines(doc)[3 : lines(doc).index(next(ln for ln in lines(doc) if ln.startswith("TOTAL")))]
    amounts = [cents(re.findall(r"[\d,]+\.\d\d", ln)[-1]) for ln in body]
    total = value_after(doc, "TOTAL")
    assert sum(amounts) == cents(total) and answers(doc)["What is the total?"]["answer"] == total
    assert answers(doc)["How many different products were bought?"]["answer"] == str(len(body))


@pytest.mark.parametrize("seed", SEEDS)
def test_form_pay(seed):
    doc = make_doc("form", seed)
    hours, rate = int(value_after(doc, "Hours worked:")), int(value_after(doc, "Hourly rate:"))
    pay = answers(doc)["What is the pay for the hours worked at the hourly rate?"]["answer"]
    assert pay == str(hours * rate)
    for key, value in doc.fields.items():
        assert value_after(doc, f"{key}:") == value


@pytest.mark.parametrize("seed", SEEDS)
def test_table_sums(seed):
    doc = make_doc("table", seed)
    head, *rows = [ln.split(" | ") for ln in lines(doc) if " | " in ln]
    a = answers(doc)
    q = next(q for q in a if q.startswith("What is the total of the "))
    col = head.index(re.search(r"the (\S+) column", q).group(1))
    assert a[q]["answer"] == str(sum(int(r[col]) for r in rows))
    assert a["How many regions are listed?"]["answer"] == str(len(rows))
    q = next(q for q in a if q.startswith("Which region has the highest"))
    col = head.index(re.search(r"highest (\S+) value", q).group(1))
    check_choice(a[q], max(rows, key=lambda r: int(r[col]))[0])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["bar_chart", "line_chart"])
def test_chart_values_match_the_pixels(kind, seed):
    doc = make_doc(kind, seed)
    g, im = doc.chart["geometry"], doc.clean[0].image
    color = tuple(g["color"])
    measured = []
    for cx, _ in g["points"]:
        if kind == "bar_chart":  # walk up the bar's centre column from the axis
            y = g["base"] - 1
            while im.getpixel((cx, y)) == color:
                y -= 1
            top = y + 1
        else:  # the marker's centre: the middle of the coloured run in its column
            column = [y for y in range(im.height) if im.getpixel((cx, y)) == color]
            runs = [y for y in column if abs(y - column[len(column) // 2]) <= 4]
            top = (min(runs) + max(runs)) / 2
        measured.append((g["base"] - top) / g["scale"])
    for got, want in zip(measured, doc.chart["values"]):
        assert abs(got - want) <= 1 / g["scale"] + 0.5, (measured, doc.chart["values"])
    # answers re-derived from the plotted values
    values, labels = doc.chart["values"], doc.chart["labels"]
    a = answers(doc)
    assert a["What is the sum of all values?"]["answer"] == str(sum(values))
    q = next(q for q in a if q.startswith("What is the value for"))
    assert a[q]["answer"] == str(values[labels.index(q[len("What is the value for ") : -1])])
    check_choice(a["Which label has the highest value?"], labels[values.index(max(values))])


@pytest.mark.parametrize("seed", SEEDS)
def test_report_pages(seed):
    doc = make_doc("report", seed)
    assert len(doc.pages) == doc.fields["pages"] >= 2
    for k, page in enumerate(doc.clean, 1):
        assert f"Page {k} of {len(doc.pages)}" in page.transcription
        year = re.search(r"Results for (\d{4})", page.transcription).group(1)
        assert doc.fields[year]["page"] == k
        rev, cost = (cents(re.search(rf"{x}: (.*)", page.transcription).group(1)) for x in ("Revenue", "Costs"))
        q = f"What is the revenue minus the costs in {year}?"
        if q in answers(doc):
            assert cents(answers(doc)[q]["answer"]) == rev - cost


def test_eval_seeds_are_reserved(tmp_path):
    with pytest.raises(NanovlError, match="reserved"):
        write_dataset(tmp_path, 2, ["form"], start=EVAL_SEED_START - 1)
    counts = write_dataset(tmp_path / "ev", 1, ["form", "bar_chart"], split="eval")
    recs = [json.loads(x) for x in (tmp_path / "ev" / "eval.jsonl").read_text().splitlines()]
    assert counts["eval.jsonl"] == len(recs) and all(r["seed"] >= EVAL_SEED_START for r in recs)
    assert {r["type"] for r in recs} >= {"extractive", "chart", "transcription"}
    train = [json.loads(x) for x in (tmp_path / "ev" / "qa.jsonl").read_text().splitlines()]
    assert all(r["meta"]["split"] == "eval" for r in train)  # and the trainer refuses them (test_train)


def test_text_instructions_are_deterministic_and_right():
    assert text_instruction(3) == text_instruction(3)
    for s in range(60):
        r = text_instruction(s)
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", q):
            assert int(a) == int(m[1]) + int(m[2])
        elif m := re.fullmatch(r"What is (\d+) minus (\d+)\?", q):
            assert int(a) == int(m[1]) - int(m[2])
        elif q.startswith("Sort"):
            nums = [int(x) for x in q.split(": ")[1].split(", ")]
            assert a == ", ".join(map(str, sorted(nums)))
        elif q.startswith("Write the name"):
            name, city = re.search(r"Name: (.*?)\.", q)[1], re.search(r"City: (.*?)\.", q)[1]
            assert json.loads(a) == {"name": name, "city": city}


def test_copy_tasks_repeat_their_text_and_are_written_by_synth(tmp_path):
    assert copy_instruction(5) == copy_instruction(5) != copy_instruction(6)
    for s in range(30):
        q, a = (m["content"] for m in copy_instruction(s)["messages"])
        assert q == f"{COPY}\n{a}" and a.strip() and len(a.splitlines()) <= 6
    counts = write_dataset(tmp_path, 0, copy_count=7)
    assert counts == {"copy.jsonl": 7}
    rows = [json.loads(x) for x in (tmp_path / "copy.jsonl").read_text().splitlines()]
    assert [r["meta"]["task"] for r in rows] == ["copy"] * 7 and all(r["images"] == [] for r in rows)


def test_qa_conversations_hold_every_question_in_a_varying_order():
    from nanovl.synth.records import doc_records

    firsts = set()
    for seed in range(8):
        doc = make_doc("invoice", seed)
        msgs = doc_records(doc, ["p.png"], "train")["qa"][0]["messages"]
        pairs = [(msgs[k]["content"].removeprefix("<image>\n"), msgs[k + 1]["content"]) for k in range(0, len(msgs), 2)]
        assert sorted(pairs) == sorted((q["question"], q["answer"]) for q in doc.qa)
        assert msgs[0]["content"].startswith("<image>\n") and all("<image>" not in m["content"] for m in msgs[1:])
        firsts.add(pairs[0][0].split("\n")[0])
    assert len(firsts) >= 4  # the first question differs between documents
