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
