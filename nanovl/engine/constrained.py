"""Constrained decoding: completions that are valid JSON, or valid against a JSON schema.

lm-format-enforcer walks a character-level JSON (schema) parser over the token vocabulary and says
which tokens may come next; the sampler masks every other token, and end-of-sequence becomes possible
only where the JSON is complete. A completion cut short by max_tokens ends with finish_reason
"length" and may be unfinished JSON; given room, it always parses (strict JSON) and validates.

Tokens that decode to no text, to a lone piece of a multi-byte character (U+FFFD), or that contain a
raw control character are never offered: strict JSON has no raw control characters in strings,
and byte pieces would let the parser count a replacement character (or nothing) where the output
holds broken UTF-8 (a `maxLength` string could then never close). Every character stays reachable
through whole-character tokens or JSON's `\\uXXXX` escapes.

Numbers are plain decimals and objects take no trailing comma (`_fix_enforcer`): lm-format-enforcer
allows both, and they give output that does not parse or validate.

Schemas are compiled when a request is admitted (`compile_constraint`): what the enforcer cannot
compile, a schema that admits no value, and a `$ref` that is not local (`#/...`: nothing is fetched)
are request errors, not failures in the middle of decoding.
"""

from __future__ import annotations

import json
import weakref

import torch

from nanovl.errors import RequestError

_TOKENIZER_DATA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
MAX_NUMBER_CHARS = 32


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
    except RecursionError:
        raise RequestError("invalid JSON schema: nested too deeply") from None
    for node in _nodes(schema):
        ref = node.get("$ref")
        if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
            raise RequestError(f"JSON schema $ref {ref!r}: only local references (#/...) are supported")
        for lo, hi in (("minLength", "maxLength"), ("minItems", "maxItems")):
            if isinstance(node.get(lo), int) and isinstance(node.get(hi), int) and node[lo] > node[hi]:
                raise RequestError(f"JSON schema: {lo} {node[lo]} is above {hi} {node[hi]}")
    return schema


def _nodes(schema) -> list[dict]:
    """Every object in a schema, without recursion."""
    nodes, stack = [], [schema]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            nodes.append(v)
            stack += v.values()
        elif isinstance(v, list):
            stack += v
    return nodes


def _tokenizer_data(tokenizer, vocab_size: int):
    """The vocabulary as lm-format-enforcer needs it: each token's text, and whether it starts a word
    (decoded after a "0" token, as its transformers integration does); and the parser's alphabet:
    its own (ASCII) plus every other character of these tokens. A character outside the alphabet
    silently ends lm-format-enforcer's parse (an unclosed string would then accept end-of-sequence).
    Built once per tokenizer."""
    from lmformatenforcer.consts import COMPLETE_ALPHABET
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
        if not after_zero or "\ufffd" in after_zero or any(ord(c) < 0x20 and c not in " \t\n\r" for c in after_zero):
            continue
        if any(c in "\t\n\r" for c in after_zero) and after_zero.strip():
            continue  # a raw tab or newline glued to other text could land inside a string
        regular.append((i, after_zero, len(after_zero) > len(tk.decode([i]))))
    data = TokenEnforcerTokenizerData(
        regular, lambda ids: tk.decode(ids).rstrip("\ufffd"), list(tokenizer.eos_token_ids), False, vocab_size
    )
    extra = {c for _, text, _ in regular for c in text} - set(COMPLETE_ALPHABET) - set(" \t\n\r\\")
    _TOKENIZER_DATA[tokenizer] = data, COMPLETE_ALPHABET + "".join(sorted(extra))
    return _TOKENIZER_DATA[tokenizer]


def _fix_enforcer():
    """Two fixes to lm-format-enforcer's JSON states, as subclasses put where its parser looks the
    classes up (module names), once per process:
    - numbers without an exponent: it allows one for integers too, and `1e-5` (no integer) or
      `1e999` (infinite) parse but fail the schema; and at most MAX_NUMBER_CHARS characters, so
      a model cannot write digits forever (a double holds 17 significant digits);
    - no `}` right after a comma: its object state allows a trailing comma (`{"a": 1,}`) when
      every required key is there;
    - whitespace at the start of a string is part of it: it is skipped as if outside the string,
      so `maxLength` / `minLength` miscount it."""
    from lmformatenforcer import jsonschemaparser as jp

    if getattr(jp.NumberParsingState, "nanovl", False):
        return

    class PlainNumber(jp.NumberParsingState):
        nanovl = True

        def get_allowed_characters(self) -> str:
            if len(self.parsed_string) >= MAX_NUMBER_CHARS and self.can_end():
                return ""  # only what may follow the number
            return super().get_allowed_characters().replace("e", "").replace("E", "")

    class NoTrailingComma(jp.ObjectParsingState):
        after_comma = False

        def clone(self):
            clone = super().clone()
            clone.after_comma = self.after_comma
            return clone

        def add_character(self, new_character: str):
            new = super().add_character(new_character)
            if new_character.strip():
                new.after_comma = new_character == "," and new.current_stage == jp.ObjectParsingStage.PARSING_KEY_OR_END
            return new

        def get_allowed_characters(self) -> str:
            allowed = super().get_allowed_characters()
            return allowed.replace("}", "") if self.after_comma else allowed

    class CountedString(jp.StringParsingState):
        def add_character(self, new_character: str):
            opened = self.seen_opening_quote and not self.seen_closing_quote and not self.parsed_string
            if opened and new_character in jp.WHITESPACE_CHARACTERS:
                new = jp.PrimitiveParsingState.add_character(self, new_character)  # a clone, one more character
                if new.regex_parser:
                    new.regex_parser = new.regex_parser.add_character(new_character)
                return new
            return super().add_character(new_character)

    jp.NumberParsingState, jp.ObjectParsingState, jp.StringParsingState = PlainNumber, NoTrailingComma, CountedString


class JsonConstraint:
    """Which tokens may follow `prompt + generated` so that the completion stays valid JSON."""

    def __init__(self, tokenizer, vocab_size: int, schema: dict | None = None):
        from lmformatenforcer import CharacterLevelParserConfig, JsonSchemaParser
        from lmformatenforcer.tokenenforcer import TokenEnforcer

        self.schema = check_schema(schema)
        _fix_enforcer()
        data, alphabet = _tokenizer_data(tokenizer, vocab_size)
        config = CharacterLevelParserConfig(alphabet=alphabet, max_consecutive_whitespaces=2)
        parser = JsonSchemaParser(self.schema, config=config)
        self.enforcer = TokenEnforcer(data, parser)
        parser.config = config  # TokenEnforcer replaces it with one whose alphabet is the 1-char tokens
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


def compile_constraint(tokenizer, vocab_size: int, schema: dict | None, prompt: list[int]) -> JsonConstraint:
    """A constraint for `prompt` (schema None: any JSON object), compiled and probed once at admission;
    what the enforcer cannot handle is a RequestError here rather than an error mid-decode."""
    try:
        constraint = JsonConstraint(tokenizer, vocab_size, {"type": "object"} if schema is None else schema)
        allowed = constraint.mask(torch.zeros(vocab_size), prompt)
    except RequestError:
        raise
    except Exception as e:  # lm-format-enforcer raises plain Exception / ValueError / NotImplementedError
        raise RequestError(f"this JSON schema cannot be enforced ({type(e).__name__}: {e})") from None
    if not torch.isfinite(allowed).any():
        raise RequestError("this JSON schema admits no value")
    return constraint


def constraint_for(tokenizer, vocab_size: int, params, prompt: list[int]) -> JsonConstraint | None:
    """The compiled constraint `params.json_schema` asks for (True: any JSON object), or None."""
    schema = params.json_schema
    if schema is None or schema is False:
        return None
    return compile_constraint(tokenizer, vocab_size, schema if isinstance(schema, dict) else None, prompt)


def load_schema_file(path: str) -> dict:
    try:
        with open(path) as f:
            return check_schema(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        raise RequestError(f"{path}: not a readable JSON schema ({e})") from None
