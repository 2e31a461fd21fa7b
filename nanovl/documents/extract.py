"""Grounded extraction: a JSON schema in, every leaf field out as {"value", "confidence", "evidence"}.

- The model answers under decoding constrained to the schema (engine/constrained.py), greedy, so
  the output always parses and validates when it has room.
- confidence: the joint probability of the value's own tokens, the product of each chosen token's
  probability under the model (the log-probabilities an OpenAI-compatible server returns, so a local
  model and an endpoint give the same number). Why the product and not the mean or the minimum: a
  value is right only when every one of its tokens is, and the product is the model's probability
  of exactly this value given the page and the JSON before it. Tokens that also carry JSON
  structure (a quote, a comma) count when they overlap the value. A calibration map, when one is
  stored beside the model (`extract_calibration.json`), turns it into the probability of being right.
- evidence: documents/evidence.py finds the value in the document's text (never a box the model
  drew); when it cannot, `evidence` is null and `no_evidence` says why.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from PIL import Image

from nanovl.documents.evidence import PageText, locate, ocr_available, ocr_text, pdf_text
from nanovl.errors import NanovlError, RequestError
from nanovl.media import DEFAULT_DPI, is_pdf, parse_pages, read_source

CALIBRATION_FILE = "extract_calibration.json"
_WS = re.compile(r"[ \t\n\r]*")
LEAF_TYPES = ("string", "number", "integer", "boolean", "null")


def fields_schema(fields: str | list[str]) -> dict:
    """`total,date,vendor` -> an object schema of those string fields, all required."""
    names = [f.strip() for f in (fields.split(",") if isinstance(fields, str) else fields)]
    if not names or not all(names):
        raise RequestError("--fields: give field names separated by commas, e.g. total,date,vendor")
    if len(set(names)) != len(names):
        raise RequestError("--fields: a field name is given twice")
    return {"type": "object", "properties": {n: {"type": "string"} for n in names}, "required": names,
            "additionalProperties": False}  # fmt: skip


def check_extract_schema(schema) -> dict:
    """A schema extraction can fill: valid (meta-schema), an object at the root, and made of what the
    constrained decoder enforces; anything else is a RequestError naming the feature."""
    from nanovl.engine.constrained import check_schema

    check_schema(schema)
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict) or not schema["properties"]:
        raise RequestError('the extraction schema must be an object with "properties" (the fields to extract)')
    for key in ("patternProperties", "if", "not", "dependentSchemas", "unevaluatedProperties"):
        if any(key in node for node in _schema_nodes(schema)):
            raise RequestError(f"JSON schema feature {key!r} is not supported for extraction")
    return schema


def _schema_nodes(schema) -> list[dict]:
    from nanovl.engine.constrained import _nodes

    return _nodes(schema)


def load_extract_schema(path: str) -> dict:
    try:
        with open(path) as f:
            schema = json.load(f)
    except OSError as e:
        raise RequestError(f"{path}: cannot read the schema ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise RequestError(f"{path}: not JSON ({e})") from None
    try:
        return check_extract_schema(schema)
    except RequestError as e:
        raise RequestError(f"{path}: {e}") from None


MAX_STRING = 100  # characters of a string field whose schema gives no maxLength
ARRAY_ITEMS = 20  # lm-format-enforcer's cap on an array whose schema gives no maxItems
MAX_BUDGET = 4096  # the default token budget's ceiling: it is reserved in the context, beside the pages


def bounded(schema: dict) -> dict:
    """The schema as extraction enforces it, so that any model's answer ends: strings of at most
    MAX_STRING characters where no maxLength is given, and objects with only their listed
    properties where additionalProperties is not given (arrays: lm-format-enforcer's default cap,
    ARRAY_ITEMS items, where no maxItems is given)."""
    schema = json.loads(json.dumps(schema))
    for node in _schema_nodes(schema):
        kinds = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
        if "string" in kinds and "maxLength" not in node and "enum" not in node and "const" not in node:
            node["maxLength"] = max(MAX_STRING, node.get("minLength", 0))
        if "object" in kinds and "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
    return schema


def token_budget(schema: dict) -> int:
    """Enough new tokens for the longest answer a bounded schema admits (a token is at least one
    character): the default of `max_new_tokens`, so that the answer of any model ends, even one
    that fills every string (a random checkpoint does); at most MAX_BUDGET, as it is reserved in the
    context beside the pages (a schema that can need more: pass max_new_tokens)."""
    from nanovl.engine.constrained import MAX_NUMBER_CHARS

    def chars(node, depth=0) -> int:
        if not isinstance(node, dict) or depth > 32:
            return 64
        if "enum" in node or "const" in node:
            options = node.get("enum", [node.get("const")])
            return max(len(json.dumps(o)) for o in options) if options else 8
        for key in ("anyOf", "oneOf"):
            if key in node:
                return max(chars(x, depth + 1) for x in node[key])
        kinds = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
        best = 8
        if "string" in kinds:
            best = max(best, node.get("maxLength", MAX_STRING) + 4)
        if "number" in kinds or "integer" in kinds:
            best = max(best, MAX_NUMBER_CHARS + 2)
        if "object" in kinds:
            props = node.get("properties", {})
            best = max(best, 4 + sum(len(k) + 6 + chars(v, depth + 1) for k, v in props.items()))
        if "array" in kinds:
            best = max(best, 4 + node.get("maxItems", ARRAY_ITEMS) * (2 + chars(node.get("items", {}), depth + 1)))
        return best

    return min(chars(schema) + 16, MAX_BUDGET)


def extract_prompt(schema: dict) -> str:
    """The instruction: the fields by name (with their descriptions), values as printed."""
    lines = []
    for name, spec in schema["properties"].items():
        about = spec.get("description") if isinstance(spec, dict) else None
        lines.append(f"- {name}" + (f": {about}" if about else ""))
    return ("Extract these fields from the document as JSON, each value exactly as printed on the document:\n"
            + "\n".join(lines))  # fmt: skip


def leaf_spans(text: str) -> list[tuple[tuple, object, int, int]]:
    """Every leaf of the JSON in `text`: (path, value, start, end), [start, end) the characters of the
    value in `text` (inside the quotes for strings). Raises ValueError on text that is not JSON."""
    decoder, out = json.JSONDecoder(), []

    def skip(i: int) -> int:
        return _WS.match(text, i).end()

    def expect(i: int, chars: str) -> int:
        if i >= len(text) or text[i] not in chars:
            raise ValueError(f"expected {chars!r} at {i}")
        return i

    def value(i: int, path: tuple) -> int:
        i = skip(i)
        if i < len(text) and text[i] in "{[":
            close, n = "}" if text[i] == "{" else "]", 0
            i = skip(i + 1)
            if i < len(text) and text[i] == close:
                return i + 1
            while True:
                if close == "}":
                    key, i = json.decoder.scanstring(text, expect(i, '"') + 1)
                    i = value(expect(skip(i), ":") + 1, (*path, key))
                else:
                    i = value(i, (*path, n))
                    n += 1
                i = expect(skip(i), "," + close)
                if text[i] == close:
                    return i + 1
                i = skip(i + 1)
        v, end = decoder.scan_once(text, i)
        out.append((path, v, i + 1, end - 1) if text[i] == '"' else (path, v, i, end))
        return end

    try:
        end = value(0, ())
    except StopIteration as e:
        raise ValueError(f"no JSON value at {e.value}") from None
    if skip(end) != len(text):
        raise ValueError("text after the JSON value")
    return out


def value_confidence(start: int, end: int, offsets: list[tuple[int, int]], logprobs: list[float]) -> float:
    """exp of the summed log-probabilities of the tokens overlapping [start, end) (an empty string:
    the tokens of its quotes)."""
    if end <= start:
        start, end = start - 1, end + 1
    total = sum(lp for (a, b), lp in zip(offsets, logprobs) if a < end and b > start)
    return math.exp(total)


class Calibration:
    """A monotone map from raw confidence to the probability of being right: piecewise-linear
    through the points an isotonic fit gave (`nanovl extract calibrate`)."""

    def __init__(self, xs: list[float], ys: list[float], source: str = ""):
        self.xs, self.ys, self.source = xs, ys, source

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            d = json.loads(Path(path).read_text())
            xs, ys = [float(x) for x in d["x"]], [float(y) for y in d["y"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise NanovlError(f"{path}: not a calibration file ({e})") from None
        if not xs or len(xs) != len(ys) or xs != sorted(xs) or ys != sorted(ys):
            raise NanovlError(f"{path}: a calibration needs matching, increasing x and y lists")
        return cls(xs, ys, str(path))

    def __call__(self, p: float) -> float:
        import numpy as np

        return float(np.interp(p, self.xs, self.ys))


def find_calibration(model_dir: Path | None, path: str | Path | None = None) -> Calibration | None:
    if path is not None:
        return Calibration.load(path)
    if model_dir is not None and (model_dir / CALIBRATION_FILE).is_file():
        return Calibration.load(model_dir / CALIBRATION_FILE)
    return None


def document_text(src, pages: str | None, dpi: float, images=None) -> tuple[list[int], list, list[str]]:
    """The selected page numbers (1-based), their text with boxes, and for each page without text
    why not. PDF text layers first; pages with none (and images) through OCR when it is installed
    (`images`: a loader per page of the rendered pages; OCR boxes of PDF pages scaled to points)."""
    data = None if isinstance(src, Image.Image) else read_source(src, "document")[0]
    if data is not None and is_pdf(data):
        import pypdfium2 as pdfium

        from nanovl.media import PDFIUM_LOCK

        with PDFIUM_LOCK:
            doc = pdfium.PdfDocument(data)
            count = len(doc)
            doc.close()
        selected = parse_pages(pages, count)
        texts, scale = pdf_text(data, selected), 72.0 / dpi
    else:
        selected, texts, scale = [0], [None], 1.0
    reasons = [""] * len(texts)
    why = ocr_available() if None in texts else None
    for k, t in enumerate(texts):
        if t is not None:
            continue
        if why is not None or images is None:
            reasons[k] = f"page {selected[k] + 1} has no text layer, and {why or 'OCR was not asked for'}"
            continue
        page = ocr_text(images[k](), selected[k] + 1)
        page.boxes = [None if b is None else tuple(v * scale for v in b) for b in page.boxes]
        texts[k] = page if page.text.strip() else None
        reasons[k] = "" if texts[k] else f"page {selected[k] + 1}: OCR found no text"
    return [i + 1 for i in selected], texts, reasons


def ground(value, texts: list[PageText | None], reasons: list[str], confidence: float, calibration) -> dict:
    p = calibration(confidence) if calibration else confidence
    leaf = {"value": value, "confidence": float(f"{p:.4g}")}
    found = locate(value, texts)
    leaf["evidence"] = found
    if found is None:
        if value is None or isinstance(value, bool):
            leaf["no_evidence"] = "not a string or number"
        elif all(t is None for t in texts):
            leaf["no_evidence"] = "; ".join(r for r in reasons if r)
        else:
            leaf["no_evidence"] = "not found in the document's text"
    return leaf


def wrap(parsed, leaves: dict[tuple, dict]):
    """The parsed JSON with each leaf replaced by its {"value", "confidence", "evidence"}."""

    def walk(v, path):
        if isinstance(v, dict):
            return {k: walk(x, (*path, k)) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x, (*path, i)) for i, x in enumerate(v)]
        return leaves[path]

    return walk(parsed, ())


def grounded(text: str, offsets, logprobs, texts, reasons, calibration) -> dict:
    """The model's JSON text -> the wrapped fields."""
    parsed = json.loads(text)
    leaves = {
        path: ground(v, texts, reasons, value_confidence(a, b, offsets, logprobs), calibration)
        for path, v, a, b in leaf_spans(text)
    }
    return wrap(parsed, leaves)


def extract(backend, src, schema: dict, pages: str | None = None, dpi: float = DEFAULT_DPI, max_tiles=None,
            max_new_tokens: int | None = None, calibration=None) -> dict:  # fmt: skip
    """One document (a path, bytes, ...) -> {"fields", "pages", "confidence", "raw"} through a backend
    (documents/backends.py). max_new_tokens None: what the schema can need (`token_budget`).
    calibration: a Calibration; None: the one stored beside a local model, if any; False: none."""
    from nanovl.processor import scan_media

    check_extract_schema(schema)
    if calibration is None:
        calibration = find_calibration(backend.path)
    calibration = calibration or None
    media = scan_media([src], pages, dpi)
    enforced = bounded(schema)
    budget = max_new_tokens or token_budget(enforced)
    answer = backend.complete(media, extract_prompt(schema), budget, enforced, max_tiles)
    return finish_extraction(answer.text, answer.offsets, answer.logprobs, answer.finish_reason, src, pages, dpi,
                             media, calibration)  # fmt: skip


def finish_extraction(text, offsets, logprobs, finish, src, pages, dpi, media, calibration) -> dict:
    """The model's JSON answer -> the record: every leaf grounded in the document's text."""
    if finish == "length":
        raise RequestError(f"the answer ran out of tokens before the JSON was complete: {text[:80]!r}...")
    numbers, texts, reasons = document_text(src, pages, dpi, [m.load for m in media])
    return {
        "fields": grounded(text, offsets, logprobs, texts, reasons, calibration),
        "pages": numbers,
        "confidence": "calibrated" if calibration else "joint token probability (uncalibrated)",
        "raw": text,
    }
