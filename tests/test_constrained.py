"""Constrained decoding: completions that parse as JSON and validate against the schema."""

import json

import jsonschema
import pytest

import nanovl
from nanovl.engine import SamplingParams
from nanovl.errors import RequestError

SCHEMA = {
    "type": "object",
    "properties": {
        "currency": {"enum": ["EUR", "USD", "CHF"]},
        "paid": {"type": "boolean"},
        "kind": {"enum": ["invoice", "receipt", "form"]},
    },
    "required": ["currency", "paid", "kind"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_schema_output_validates(family, tiny_llama, tiny_qwen2):
    m = nanovl.load({"llama": tiny_llama, "qwen2": tiny_qwen2}[family], dtype="float32")
    for seed in range(3):
        c = m.generate("Extract the fields:", max_new_tokens=120, json_schema=SCHEMA, temperature=1.0, seed=seed)
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_json_object_and_vlm_ask(tiny_v1):
    vl = nanovl.load(tiny_v1, dtype="float32")
    from PIL import Image

    c = vl.ask(Image.new("RGB", (400, 300), "white"), "Fields?", json_schema=SCHEMA, max_new_tokens=120)
    jsonschema.validate(json.loads(c.text), SCHEMA)
    free = vl.generate("{", max_new_tokens=60, json_schema=True, temperature=0.7, seed=1)
    if free.finish_reason == "stop":  # any JSON object; a long random one may hit the token limit first
        assert isinstance(json.loads(free.text), dict)


def test_invalid_schema_is_a_request_error():
    with pytest.raises(RequestError, match="invalid JSON schema"):
        SamplingParams(json_schema={"type": "object", "properties": {"a": {"type": "nonsense"}}})


def test_cli_json_schema(tiny_v1, tmp_path, capsys):
    from PIL import Image

    from nanovl.cli import main

    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    Image.new("RGB", (300, 300), "white").save(tmp_path / "p.png")
    rc = main(["ask", "--model", str(tiny_v1), str(tmp_path / "p.png"), "Fields?", "--json-schema",
               str(tmp_path / "schema.json"), "--max-tokens", "120"])  # fmt: skip
    assert rc == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMA)
    (tmp_path / "bad.json").write_text("{nope")
    assert (
        main(
            ["ask", "--model", str(tiny_v1), str(tmp_path / "p.png"), "Q", "--json-schema", str(tmp_path / "bad.json")]
        )
        == 1
    )


JSON_SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]},
    SCHEMA,
    {
        "type": "object",
        "properties": {
            "invoice": {
                "type": "object",
                "properties": {"number": {"type": "string", "maxLength": 8}, "total": {"type": "number"}},
                "required": ["number", "total"],
            },
            "lines": {"type": "array", "items": {"type": "integer"}, "maxItems": 4},
        },
        "required": ["invoice", "lines"],
    },
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1}}},
    None,  # any JSON object
]


def test_sampled_json_always_parses_strictly_or_ends_on_length(tiny_v1):
    """200 completions at temperature 1 from a random model (which tries its worst: byte tokens,
    control characters, endless strings) through the batch scheduler: each one parses with a strict
    JSON parser and validates, unless it ran out of tokens."""
    from nanovl.engine.constrained import compile_constraint
    from nanovl.engine.scheduler import Request, Scheduler

    vl = nanovl.load(tiny_v1, dtype="float32")
    sched = Scheduler(vl.model, vl.tokenizer, max_slots=8, max_len=512)
    prompt = vl.tokenizer.encode_chat([{"role": "user", "content": "The invoice as JSON:"}])
    done, reqs = [], []
    for i in range(200):
        schema = JSON_SCHEMAS[i % len(JSON_SCHEMAS)]
        params = vl.params(temperature=1.0, seed=i, max_new_tokens=80, json_schema=schema or True)
        constraint = compile_constraint(vl.tokenizer, vl.model.config.vocab_size, schema, prompt)
        r = Request(prompt, params, lambda d: None, constraint=constraint)
        reqs.append((r, schema))
        sched.submit(r)
        while len(sched.waiting) >= 32:
            sched.step()
    while sched.waiting or sched.rows:
        sched.step()
    for r, schema in reqs:
        text = vl.tokenizer.decode(r.output, skip_special_tokens=True)
        assert r.finish_reason in ("stop", "length"), (r.finish_reason, r.error)
        if r.finish_reason == "stop":
            value = json.loads(text, strict=True, parse_constant=pytest.fail)  # no raw control characters
            assert "\ufffd" not in text
            jsonschema.validate(value, schema or {"type": "object"})
            done.append(value)
    assert len(done) >= 100, f"only {len(done)} of 200 finished within 80 tokens"


@pytest.mark.parametrize(
    "schema, message",
    [
        ({"enum": []}, "cannot be enforced|admits no value"),
        ({"not": {}}, "cannot be enforced|admits no value"),
        ({"$ref": "https://example.com/schema.json"}, "only local references"),
        ({"type": "object", "properties": {"a": {"$ref": "http://10.0.0.1/x"}}}, "only local references"),
    ],
)
def test_schemas_the_enforcer_cannot_take_are_refused_at_admission(tiny_llama, schema, message):
    from nanovl.engine.constrained import check_schema, compile_constraint
    from nanovl.tokenizer import Tokenizer

    tk = Tokenizer(tiny_llama)
    with pytest.raises(RequestError, match=message):
        check_schema(schema)
        compile_constraint(tk, 512, schema, tk.encode("x"))


def test_numbers_end_after_32_characters(tiny_llama):
    """A model that would write digits forever: at MAX_NUMBER_CHARS the number must end."""
    import torch

    from nanovl.engine.constrained import MAX_NUMBER_CHARS, JsonConstraint

    m = nanovl.load(tiny_llama, dtype="float32")
    tk = m.tokenizer
    schema = {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}
    c = JsonConstraint(tk, m.config.vocab_size, schema)
    ids = tk.encode("Fields:")
    zeros = torch.zeros(m.config.vocab_size)
    for t in tk.tk.encode('{"n":', add_special_tokens=False).ids:  # the JSON up to the number
        assert torch.isfinite(c.mask(zeros, ids)[t]), tk.decode([t])
        ids.append(t)
    start, digit = len(ids), tk.tk.encode("7", add_special_tokens=False).ids[-1]
    wants_digits = zeros.clone()
    wants_digits[digit] = 100.0  # the model wants another digit, always
    for _ in range(MAX_NUMBER_CHARS + 5):
        nxt = int(c.mask(wants_digits, ids).argmax())
        if nxt != digit:
            break
        ids.append(nxt)
    assert len(ids) - start == MAX_NUMBER_CHARS
    assert not torch.isfinite(c.mask(zeros, ids)[digit])
