"""Constrained decoding: completions that are valid JSON, or valid against a JSON schema.

lm-format-enforcer walks a character-level JSON (schema) parser over the token vocabulary and says
which tokens may come next; the sampler masks every other token, and end-of-sequence becomes possible
only where the JSON is complete. A completion cut short by max_tokens ends with finish_reason
"length" and may be unfinished JSON; given room, it always parses and validates.
"""

from __future__ import annotations

import json
import weakref

import torch

from nanovl.errors import RequestError

_TOKENIZER_DATA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_schema(schema: dict | None) -> dict | None:
    """A JSON schema checked against its meta-schema (None: any JSON object)."""
    if schema is None:
        return None
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, dict):
        raise RequestError("the JSON schema must be an object")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise RequestError(f"invalid JSON schema: {e.message}") from None
    return schema


def _tokenizer_data(tokenizer, vocab_size: int):
    """The vocabulary as lm-format-enforcer needs it: each token's text, and whether it starts a word
    (decoded after a "0" token, as its transformers integration does). Built once per tokenizer."""
    from lmformatenforcer.tokenenforcer import TokenEnforcerTokenizerData

    cached = _TOKENIZER_DATA.get(tokenizer)
    if cached is not None:
        return cached
    tk = tokenizer.tk
    special = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
    zero = tk.encode("0", add_special_tokens=False).ids[-1]
    regular = []
    for i in range(min(vocab_size, tk.get_vocab_size(with_added_tokens=True))):
        if i in special:
            continue
        after_zero = tk.decode([zero, i])[1:]
        regular.append((i, after_zero, len(after_zero) > len(tk.decode([i]))))
    data = TokenEnforcerTokenizerData(
        regular, lambda ids: tk.decode(ids).rstrip("\ufffd"), list(tokenizer.eos_token_ids), False, vocab_size
    )
    _TOKENIZER_DATA[tokenizer] = data
    return data


class JsonConstraint:
    """Which tokens may follow `prompt + generated` so that the completion stays valid JSON."""

    def __init__(self, tokenizer, vocab_size: int, schema: dict | None = None):
        from lmformatenforcer import CharacterLevelParserConfig, JsonSchemaParser
        from lmformatenforcer.tokenenforcer import TokenEnforcer

        self.schema = check_schema(schema)
        parser = JsonSchemaParser(self.schema, config=CharacterLevelParserConfig(max_consecutive_whitespaces=2))
        data = _tokenizer_data(tokenizer, vocab_size)
        self.enforcer = TokenEnforcer(data, parser)
        # Tokens that are only whitespace are never needed in JSON (it is optional between values, and a
        # string's spaces come with its words), and a model can loop on them: they are masked too.
        self.blank = torch.zeros(vocab_size, dtype=torch.bool)
        blank_ids = [i for i, text, _ in data.regular_tokens if text and not text.strip()]
        self.blank[torch.tensor(blank_ids, dtype=torch.long)] = True

    def mask(self, logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """logits: (V,) -> the same with every disallowed next token at -inf."""
        allowed = self.enforcer.get_allowed_tokens(tokens)
        ids = torch.tensor(allowed.allowed_tokens if hasattr(allowed, "allowed_tokens") else allowed, dtype=torch.long)
        useful = ids[~self.blank[ids]]
        keep = torch.full_like(logits, float("-inf"))
        keep[(useful if len(useful) else ids).to(logits.device)] = 0
        return logits + keep


def parse_response_format(response_format: dict | None) -> dict | None:
    """OpenAI `response_format` -> {"schema": dict | None} for JSON modes, None for plain text."""
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return {"schema": None}
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            raise RequestError("response_format json_schema needs json_schema.schema")
        return {"schema": check_schema(schema)}
    raise RequestError(f"unknown response_format type {kind!r} (text, json_object, json_schema)")


def load_schema_file(path: str) -> dict:
    try:
        with open(path) as f:
            return check_schema(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        raise RequestError(f"{path}: not a readable JSON schema ({e})") from None
