"""Tokenizer and chat template from a checkpoint folder, without transformers and without the network.

- `tokenizer.json` through the `tokenizers` library; its post-processor adds BOS for raw prompts.
- The chat template comes from `chat_template.jinja` (transformers 5 writes it there) or from
  `chat_template` in `tokenizer_config.json` (a string, or a list of named templates). It renders in
  jinja2's immutable sandbox with the same environment transformers uses (trim_blocks, lstrip_blocks,
  loop controls, `tojson`, `raise_exception`, `strftime_now`), so prompts match `apply_chat_template`.
- End-of-turn ids come from `generation_config.json`, then `config.json`, then the tokenizer's eos token.
- Streaming text uses `tokenizers.decoders.DecodeStream`, which never emits half of a multi-byte character.
- Text from a client is text: `escape` marks the control-token strings it contains (`<|eot_id|>`,
  `<IMG_CONTEXT>`, ...) and the media placeholders, and `encode_rendered` encodes the marked spans
  as plain characters, so a user cannot close a turn or forge an image by typing its token.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from nanovl.config import read_json
from nanovl.errors import CheckpointError, RequestError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# An escaped span: a private-use character, the index of the literal it stands for, another.
ESC_OPEN, ESC_CLOSE = "\ue000", "\ue001"
_ESCAPED = re.compile(ESC_OPEN + "([0-9]+)" + ESC_CLOSE)
PLACEHOLDER_TEXT = ("<image>", "<video>", "<document>")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; renders as-is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def sandboxed_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value) -> str | None:
    # tokenizer_config writes special tokens as "<s>" or as {"content": "<s>", ...}
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, model_dir: str | Path, eos_token_ids: list[int] | None = None):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir} has no tokenizer.json")
        try:
            self.tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise CheckpointError(f"{path} is not a valid tokenizer file ({e})") from None
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = read_json(cfg_path) if cfg_path.is_file() else {}
        self.special_tokens = {k: _token_text(cfg.get(k)) for k in SPECIAL_TOKEN_KEYS if cfg.get(k) is not None}
        self.chat_template = self._find_template(model_dir, cfg)
        self._compiled = None
        self.eos_token_ids = self._find_eos(model_dir, eos_token_ids or [])
        # what `escape` marks: the escape character itself, the placeholders, every added token (longest first)
        added = sorted({t.content for t in self.tk.get_added_tokens_decoder().values()}, key=len, reverse=True)
        self.literals = [ESC_OPEN, *PLACEHOLDER_TEXT, *(t for t in added if t not in PLACEHOLDER_TEXT)]
        self._literal_re = re.compile("|".join(map(re.escape, self.literals)))
        self._literal_index = {t: i for i, t in enumerate(self.literals)}

    @staticmethod
    def _find_template(model_dir: Path, cfg: dict) -> str | None:
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text()
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        return template

    def _find_eos(self, model_dir: Path, config_eos: list[int]) -> list[int]:
        gen_path = model_dir / "generation_config.json"
        eos = read_json(gen_path).get("eos_token_id") if gen_path.is_file() else None
        ids = [eos] if isinstance(eos, int) else list(eos or config_eos)
        eos_text = self.special_tokens.get("eos_token")
        if not ids and eos_text is not None and self.tk.token_to_id(eos_text) is not None:
            ids = [self.tk.token_to_id(eos_text)]
        return ids

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = False) -> TextStream:
        return TextStream(self.tk, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if self.chat_template is None:
            raise CheckpointError("the checkpoint has no chat template (chat_template in tokenizer_config.json)")
        if self._compiled is None:
            self._compiled = sandboxed_environment().from_string(self.chat_template)
        try:
            return self._compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **{**self.special_tokens, **kwargs}
            )
        except jinja2.exceptions.TemplateError as e:
            raise RequestError(f"chat template error: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # The rendered template already holds BOS and the turn markers: no post-processor on top.
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode_rendered(text)

    def escape(self, text: str) -> str:
        """Client text -> the same text with its token strings and placeholders marked as literal."""
        return self._literal_re.sub(lambda m: f"{ESC_OPEN}{self._literal_index[m.group()]}{ESC_CLOSE}", text)

    def encode_rendered(self, text: str) -> list[int]:
        """A rendered prompt -> ids, without a post-processor; spans marked by `escape` become the
        ids of their characters as plain text (the control tokens they spell are not produced)."""
        if ESC_OPEN not in text:
            return self.encode(text, add_special_tokens=False)
        ids: list[int] = []
        pos = 0
        for m in _ESCAPED.finditer(text):
            index = int(m.group(1))
            if index >= len(self.literals):
                continue  # not one of ours: left as it is
            if m.start() > pos:
                ids += self.encode(text[pos : m.start()], add_special_tokens=False)
            ids += self.encode_plain(self.literals[index])
            pos = m.end()
        if pos < len(text):
            ids += self.encode(text[pos:], add_special_tokens=False)
        return ids

    def encode_plain(self, text: str) -> list[int]:
        """Text whose token strings are encoded as characters (never as the added tokens they spell)."""
        self.tk.encode_special_tokens = True
        try:
            ids = self.tk.encode(text, add_special_tokens=False).ids
        finally:
            self.tk.encode_special_tokens = False
        added = self.tk.get_added_tokens_decoder()
        if any(i in added for i in ids):  # added tokens that are not special still match: split them
            return [j for ch in text for j in self.tk.encode(ch, add_special_tokens=False).ids]
        return ids


class TextStream:
    """Token ids in, text deltas out: `step` never emits half of a multi-byte character, and the deltas
    of every step plus `finish()` concatenate to `decode(ids)`.

    DecodeStream holds back bytes that do not yet form a character; a sequence that ends inside one
    (or a random model's invalid bytes) is released by `finish`, which decodes the whole once.
    """

    def __init__(self, tk: HFTokenizer, skip_special_tokens: bool):
        self.tk, self.skip = tk, skip_special_tokens
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.ids: list[int] = []
        self.emitted = 0  # characters handed out so far

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        delta = self.stream.step(self.tk, token_id) or ""
        self.emitted += len(delta)
        return delta

    def finish(self) -> str:
        rest = self.tk.decode(self.ids, skip_special_tokens=self.skip)[self.emitted :]
        self.emitted += len(rest)
        return rest
