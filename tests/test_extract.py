"""Grounded extraction: evidence from text layers (corpus invoices, synthetic PDFs against the boxes
that were drawn), leaf spans and confidence, schema-valid output from tiny random checkpoints over
the whole corpus, the endpoint path, and bad schemas / documents through the CLI."""

import json
import math
from pathlib import Path

import pypdfium2 as pdfium
import pytest
from jsonschema import Draft202012Validator

from nanovl.cli import main
from nanovl.documents.backends import token_offsets
from nanovl.documents.evidence import locate, pdf_text
from nanovl.documents.extract import bounded, fields_schema, leaf_spans, value_confidence
from nanovl.errors import RequestError

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
DOCS = sorted(p for p in CORPUS.glob("*/*") if p.suffix.lower() in (".pdf", ".png", ".jpg", ".jpeg"))
needs_corpus = pytest.mark.skipif(not DOCS, reason=f"the shared corpus is not at {CORPUS}")

# The invoice2data ground truth (its JSON files), with the pages each value is printed on, read by
# hand from the PDFs. Left out: "desc" (written by invoice2data, not printed), currency codes the page
# does not print (AWS "USD", Flipkart "INR"), and free_fiber's date_start (printed "1er").
PRINTED = {
    "AmazonWebServices": {"issuer": {1}, "amount": {1}, "amount_untaxed": {1}, "date": {1}, "invoice_number": {1},
                          "partner_name": {1}, "partner_website": {1}},
    "FlipkartInvoice": {"issuer": {1}, "amount": {1}, "date": {1}, "invoice_number": {1}, "order_id": {1}},
    "QualityHosting": {"issuer": {1, 2}, "amount": {2}, "amount_untaxed": {2}, "date": {1, 2},
                       "invoice_number": {1, 2}, "vat": {1, 2}, "currency": {1, 2}},
    "free_fiber": {"issuer": {1, 2}, "amount": {1, 2}, "amount_untaxed": {1, 2}, "date": {1, 2}, "date_due": {1},
                   "invoice_number": {1, 2}, "vat": {1}, "date_end": {2}, "siren": {1}, "currency": {1, 2},
                   "line_number": {1}, "client_id": {1}},
}  # fmt: skip


def digits(s) -> str:
    return "".join(c for c in str(s) if c.isdigit())


@needs_corpus
@pytest.mark.parametrize("name", sorted(PRINTED))
def test_corpus_invoice_values_are_found_on_their_pages(name):
    pdf = CORPUS / "invoice2data" / f"{name}.pdf"
    truth = json.loads(pdf.with_suffix(".json").read_text())[0]
    data = pdf.read_bytes()
    doc = pdfium.PdfDocument(data)
    sizes = [doc[i].get_size() for i in range(len(doc))]
    doc.close()
    pages = pdf_text(data, list(range(len(sizes))))
    for field, on in PRINTED[name].items():
        found = locate(truth[field], pages)
        assert found is not None, (name, field, truth[field])
        assert found["page"] in on, (name, field, found)
        x0, y0, x1, y1 = found["bbox"]
        w, h = sizes[found["page"] - 1]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (field, found)
        value = truth[field]
        if field.startswith("date"):  # ISO in the truth, printed "August 3 , 2014", "7. Mai 2014", ...
            year, _, day = value.split("-")
            assert year in found["text"] and str(int(day)) in found["text"].replace(year, ""), (field, found)
        elif isinstance(value, float) or any(c.isdigit() for c in str(value)):
            # the page's own text there prints the same digits (1 -> "1er" would not count)
            want = digits(f"{value:.2f}" if isinstance(value, float) else value)
            assert digits(found["text"]) in (want, want.lstrip("0"), digits(str(value))), (field, found)
        else:
            assert found["text"].casefold().split() == str(value).casefold().split(), (field, found)


def test_numbers_are_not_found_inside_longer_numbers():
    from nanovl.documents.evidence import PageText

    page = PageText(1, "Total 14.115 and 4.1156 but 4.11.", [(0, 0, 1, 1)] * 33, "text-layer")
    found = locate(4.11, [page])
    assert found is not None and found["text"] == "4.11"
    assert page.text.index("4.11.") == 28 and found["bbox"] == [0, 0, 1, 1]
    assert locate(15.0, [page]) is None and locate("4.115", [page]) is None


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def test_synthetic_pdf_evidence_overlaps_the_drawn_boxes(tmp_path):
    """Held-out synthetic PDFs (`nanovl synth --pdf`): every gold field value, looked up in the PDF's
    text layer, lands on a box where the generator drew that string (IoU >= 0.5), for >= 95% of them;
    the boxes come from what was drawn (pdf.jsonl), not from the matcher."""
    assert main(["synth", str(tmp_path), "--split", "eval", "--count", "3", "--pdf", "--augment", "0"]) == 0
    records = [json.loads(line) for line in (tmp_path / "pdf.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} >= {"invoice", "receipt", "form"} and len(records) == 21
    hits = total = 0
    for r in records:
        data = (tmp_path / r["file"]).read_bytes()
        pages = pdf_text(data, list(range(len(pdfium.PdfDocument(data)))))
        assert all(p is not None for p in pages), r["file"]  # a real text layer on every page
        for field, value in r["fields"].items():
            drawn = r["boxes"][field]
            if not drawn:  # a value not drawn as one string (a sum, a label part)
                continue
            total += 1
            found = locate(value, pages)
            hits += found is not None and any(b[0] == found["page"] and iou(found["bbox"], b[1:]) >= 0.5 for b in drawn)
    assert total >= 60
    assert hits / total >= 0.95, (hits, total)


def test_leaf_spans_match_json_loads():
    text = '{"a": "x\\"y", "b": [1, 2.5, {"c": null}], "d": {"e": true, "f": ""}, "g": []}'
    spans = leaf_spans(text)
    parsed = json.loads(text)
    for path, value, a, b in spans:
        node = parsed
        for key in path:
            node = node[key]
        assert node == value
        raw = text[a:b]
        assert (json.loads(f'"{raw}"') if isinstance(value, str) else json.loads(raw)) == value
    assert [p for p, *_ in spans] == [("a",), ("b", 0), ("b", 1), ("b", 2, "c"), ("d", "e"), ("d", "f")]
    for bad in ('{"a": 1', '{"a" 1}', "[1,]x", '{"a": 1} 2'):
        with pytest.raises(ValueError):
            leaf_spans(bad)


def test_confidence_is_the_product_of_the_value_tokens():
    text = '{"total": "12.50"}'
    pieces = ['{"', "total", '":"', "12", ".", "50", '"}']
    pieces[2] = '": "'
    offsets = token_offsets(text, pieces)
    assert [text[a:b] for a, b in offsets] == pieces
    lps = [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7]
    ((_, _, a, b),) = [s for s in leaf_spans(text)]
    assert math.isclose(value_confidence(a, b, offsets, lps), math.exp(-0.4 - 0.5 - 0.6))
    assert token_offsets("ab", ["a", "?", "b"]) == [(0, 1), (1, 1), (1, 2)]


def test_schemas():
    s = fields_schema("total, date")
    assert s["required"] == ["total", "date"] and s["properties"]["date"] == {"type": "string"}
    b = bounded({"type": "object", "properties": {"x": {"type": "string"}, "y": {"type": "array", "items": {
        "type": "object", "properties": {"z": {"type": "string", "maxLength": 5}}}}}})  # fmt: skip
    assert b["properties"]["x"]["maxLength"] == 100 and b["additionalProperties"] is False
    assert b["properties"]["y"]["items"] == {"type": "object", "properties": {"z": {"type": "string", "maxLength": 5}},
                                             "additionalProperties": False}  # fmt: skip
    for bad in ("", "a,,b", "a,a"):
        with pytest.raises(RequestError):
            fields_schema(bad)


def check_record(record: dict, schema: dict):
    """A record of `nanovl extract`: every leaf is {value, confidence, evidence}, and the values
    validate against the schema."""

    def unwrap(v):
        if isinstance(v, dict) and "value" in v and "confidence" in v and "evidence" in v:
            assert 0.0 <= v["confidence"] <= 1.0
            assert v["evidence"] is None and v["no_evidence"] or {"page", "bbox", "text"} <= set(v["evidence"])
            return v["value"]
        if isinstance(v, dict):
            return {k: unwrap(x) for k, x in v.items()}
        assert isinstance(v, list)
        return [unwrap(x) for x in v]

    values = unwrap(record["fields"])
    Draft202012Validator(schema).validate(values)
    assert json.loads(record["raw"]) == values
    return values


LINE_ITEMS = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string"},
        "total": {"type": "number"},
        "paid": {"type": "boolean"},
        "lines": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 20}, "qty": {"type": "integer"}}, "required": ["name", "qty"]}},
    },
    "required": ["vendor", "total", "paid", "lines"],
}  # fmt: skip


@needs_corpus
def test_extract_every_corpus_document_with_a_random_model(tiny_v1, tmp_path, capsys):
    """Noise from a random model, but a schema-valid record for every document; the schema's strings
    are bounded so the answer always ends."""
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(LINE_ITEMS))
    out = tmp_path / "out.jsonl"
    args = ["extract", "--model", str(tiny_v1), "--schema", str(schema_file), "--dpi", "36", "--out", str(out)]
    assert main([*args, *map(str, DOCS)]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["document"] for r in records] == list(map(str, DOCS))
    for r in records:
        check_record(r, LINE_ITEMS)
        assert r["pages"] and r["pages"][0] == 1


def test_extract_api_flat_fields_and_evidence_of_what_it_read(tiny_v1, tmp_path):
    """The Python API on a synthetic invoice PDF; a value the model wrote is grounded exactly when it
    occurs in the text layer (a random model's values almost never do)."""
    import nanovl
    from nanovl.synth.kinds import make_doc
    from nanovl.synth.pdf import write_pdf

    write_pdf(make_doc("invoice", 1_000_000, 0), tmp_path / "inv.pdf")
    m = nanovl.load(tiny_v1)
    r = m.extract(tmp_path / "inv.pdf", fields="total,invoice_number", max_new_tokens=600)
    values = check_record(r, fields_schema("total,invoice_number"))
    text = pdf_text((tmp_path / "inv.pdf").read_bytes(), [0])[0].text.casefold()
    for name, leaf in r["fields"].items():
        printed = values[name].strip() and values[name].casefold().strip() in text
        assert (leaf["evidence"] is not None) == bool(printed) or leaf["evidence"]["match"] == "fuzzy"
    with pytest.raises(RequestError):
        m.extract(tmp_path / "inv.pdf")


def test_endpoint_gives_the_local_records(tiny_v1, tmp_path):
    from test_server import LiveServer

    import nanovl
    from nanovl.documents.backends import EndpointBackend
    from nanovl.documents.extract import extract
    from nanovl.serve.app import create_app
    from nanovl.synth.kinds import make_doc
    from nanovl.synth.pdf import write_pdf

    write_pdf(make_doc("receipt", 1_000_001, 0), tmp_path / "r.pdf")
    m = nanovl.load(tiny_v1, dtype="float32")
    schema = fields_schema("store,total")
    local = m.extract(tmp_path / "r.pdf", schema=schema, max_new_tokens=500)
    server = LiveServer(create_app(m, "tiny"))
    try:
        remote = extract(EndpointBackend(server.url + "/v1"), tmp_path / "r.pdf", schema, max_new_tokens=500)
    finally:
        server.stop()
    assert remote["raw"] == local["raw"]
    for name in schema["properties"]:
        a, b = local["fields"][name], remote["fields"][name]
        assert a["value"] == b["value"] and a["evidence"] == b["evidence"]
        assert math.isclose(a["confidence"], b["confidence"], rel_tol=1e-3, abs_tol=1e-300)


def test_cli_bad_schemas_and_documents(tiny_v1, tmp_path, capsys):
    def run(*args):
        rc = main(["extract", "--model", str(tiny_v1), *args])
        return rc, capsys.readouterr()

    page = tmp_path / "page.png"
    from PIL import Image

    Image.new("RGB", (200, 100), "white").save(page)
    cases = {
        "notjson.json": ("{", "not JSON"),
        "array.json": (json.dumps({"type": "array"}), "must be an object"),
        "meta.json": (json.dumps({"type": "object", "properties": {"a": {"type": 5}}}), "invalid JSON schema"),
        "pattern.json": (
            json.dumps(
                {
                    "type": "object",
                    "properties": {"a": {"type": "object", "patternProperties": {"x": {"type": "string"}}}},
                }
            ),
            "patternProperties",
        ),  # fmt: skip
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        rc, cap = run(str(page), "--schema", str(tmp_path / name))
        assert rc == 1 and message in cap.err and cap.out == "", (name, cap.err)
    rc, cap = run(str(page), "--schema", str(tmp_path / "missing.json"))
    assert rc == 1 and "cannot read the schema" in cap.err
    rc, cap = run(str(page))
    assert rc == 1 and "--schema" in cap.err and "--fields" in cap.err
    # a corrupt document: an error record, and the documents after it are still done
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 broken")
    rc, cap = run(str(tmp_path / "broken.pdf"), str(page), "--fields", "total", "--max-tokens", "400")
    records = [json.loads(line) for line in cap.out.splitlines()]
    assert rc == 1 and "1 of 2 document(s) failed" in cap.err
    assert "cannot open PDF" in records[0]["error"] and "fields" in records[1]


def test_server_extract_endpoint(tiny_v1, tmp_path):
    """POST /v1/extract gives the records the Python API gives; bad requests are 400s with the reason,
    and the server stays up."""
    import base64

    import httpx
    from test_server import LiveServer

    import nanovl
    from nanovl.serve.app import create_app
    from nanovl.synth.kinds import make_doc
    from nanovl.synth.pdf import write_pdf

    write_pdf(make_doc("invoice", 1_000_002, 0), tmp_path / "inv.pdf")
    m = nanovl.load(tiny_v1, dtype="float32")
    local = m.extract(tmp_path / "inv.pdf", fields="total,date", max_new_tokens=500)
    url = "data:application/pdf;base64," + base64.b64encode((tmp_path / "inv.pdf").read_bytes()).decode()
    server = LiveServer(create_app(m, "tiny", api_key="k"))
    headers = {"Authorization": "Bearer k"}
    try:
        post = lambda body: httpx.post(server.url + "/v1/extract", json=body, headers=headers, timeout=120)  # noqa: E731
        r = post({"document": url, "fields": "total,date", "max_tokens": 500})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["raw"] == local["raw"] and body["fields"] == local["fields"] and body["pages"] == [1]
        assert body["usage"]["completion_tokens"] > 0
        bad = {
            "both": ({"document": url, "fields": "a", "schema": {"type": "object"}}, "one of them"),
            "schema": ({"document": url, "schema": {"type": "array"}}, "must be an object"),
            "local path": ({"document": str(tmp_path / "inv.pdf"), "fields": "a"}, "local media paths are disabled"),
            "pages": ({"document": url, "fields": "a", "pages": "3"}, "out of range"),
            "unknown key": ({"document": url, "fields": "a", "temperature": 1}, "temperature"),
            "not a document": ({"document": "data:image/png;base64,AAAA", "fields": "a"}, "not an image or PDF"),
        }
        for name, (request, message) in bad.items():
            r = post(request)
            assert r.status_code == 400 and message in r.text, (name, r.status_code, r.text)
        assert httpx.post(server.url + "/v1/extract", json={"document": url, "fields": "a"}).status_code == 401
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
    finally:
        server.stop()


def test_every_held_out_synthetic_document_gives_a_schema_valid_record(tiny_v1, tmp_path):
    """A random model fills every string to its bound; the default token budget still lets each
    answer finish, for the fields of every kind (the held-out split, one document per kind)."""
    import nanovl

    assert main(["synth", str(tmp_path), "--split", "eval", "--count", "1", "--pdf"]) == 0
    m = nanovl.load(tiny_v1)
    records = [json.loads(line) for line in (tmp_path / "pdf.jsonl").read_text().splitlines()]
    assert len(records) == 7
    for r in records:
        schema = fields_schema(list(r["fields"]))
        check_record(m.extract(tmp_path / r["file"], schema=schema), schema)


ocr = pytest.mark.skipif(
    __import__("nanovl.documents.evidence", fromlist=["x"]).ocr_available() is not None,
    reason="no OCR engine here (tesseract and pytesseract): the scan path is optional",
)


@needs_corpus
@ocr
def test_ocr_evidence_on_scanned_receipts(tmp_path):
    """The SROIE receipts (photos, no text layer) with tesseract: most gold values are located, and a
    located date or amount prints the same digits (fuzzy matching never turns 25/12 into 24/12). The
    same receipt as an image-only PDF gives its boxes in points."""
    from PIL import Image

    from nanovl.documents.extract import document_text
    from nanovl.media import load_document

    found = total = 0
    for src in sorted((CORPUS / "sroie").glob("*.jpg")):
        truth = json.loads(next((CORPUS / "sroie").glob(src.stem + ".gt.*.json")).read_text())
        _, texts, _ = document_text(src, None, 144, [lambda src=src: load_document(src)[0]])
        assert texts[0] is not None and texts[0].source == "ocr"
        w, h = Image.open(src).size
        for field, value in truth.items():
            total += 1
            e = locate(value, texts)
            if e is None:
                continue
            found += 1
            x0, y0, x1, y1 = e["bbox"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            if field in ("date", "total"):
                assert digits(e["text"]) == digits(value), (src.name, field, e)
    assert total == 16 and found >= 12, (found, total)
    # an image-only PDF of a receipt (72 points per inch = its pixels): boxes in points
    src = CORPUS / "sroie" / "sroie_000.jpg"
    Image.open(src).convert("RGB").save(tmp_path / "scan.pdf", resolution=72.0)
    scan = tmp_path / "scan.pdf"
    _, texts, _ = document_text(scan, None, 144, [lambda: load_document(scan)[0]])
    from_pdf = locate("25/12/2018", texts)
    _, texts, _ = document_text(src, None, 144, [lambda: load_document(src)[0]])
    from_jpg = locate("25/12/2018", texts)
    assert from_pdf and from_jpg and all(abs(a - b) <= 4 for a, b in zip(from_pdf["bbox"], from_jpg["bbox"]))


def test_fuzzy_matching_needs_the_whole_value():
    """partial_ratio scores a page shorter than the value at 100 (the value's window holds the page):
    evidence needs the plain ratio over the matched span."""
    from nanovl.documents.evidence import PageText

    page = PageText(1, "EUR", [(0, 0, 1, 1)] * 3, "text-layer")
    assert locate(" EUR and a long value the page does not print", [page]) is None
    page = PageText(1, "Billed to: Acme Logistcs GmbH, Berlin", [(0, 0, 1, 1)] * 37, "ocr")
    found = locate("Acme Logistics GmbH", [page])
    assert found is not None and found["match"] == "fuzzy" and found["text"] == "Acme Logistcs GmbH"
