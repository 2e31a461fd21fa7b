"""The Python API: load a checkpoint folder and generate from it.

import nanovl
m = nanovl.load("path/to/checkpoint")
m.generate("The capital of France is", max_new_tokens=8).text
m.chat([{"role": "user", "content": "Hi"}]).text
for piece in m.stream("Once upon a time"): print(piece, end="")
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from nanovl.config import TextConfig, load_config, read_json
from nanovl.engine import Completion, SamplingParams, generate, stream
from nanovl.errors import RequestError
from nanovl.models import text_model_class
from nanovl.models.packed import pack_linears, packing_supported
from nanovl.tokenizer import Tokenizer
from nanovl.weights import load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | None, checkpoint_dtype: str) -> torch.dtype:
    """None/"auto" -> the checkpoint's dtype, except float16, which is slow on CPUs: bfloat16 instead."""
    name = checkpoint_dtype if name in (None, "auto") else name
    if name not in DTYPES:
        raise RequestError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return torch.bfloat16 if name == "float16" else DTYPES[name]


def load_text_model(model_dir: str | Path, dtype: str | None = None, pack: bool = False):
    """Build the language model of a checkpoint on `meta` and fill it from its safetensors.

    pack: swap bf16 Linear layers for oneDNN-prepacked ones (CPU inference only; models/packed.py).
    """
    ckpt = load_config(model_dir)
    cls = text_model_class(ckpt)
    with torch.device("meta"):
        model = cls(ckpt.text)
    optional = {"lm_head.weight"} if ckpt.text.tie_word_embeddings else set()
    torch_dtype = resolve_dtype(dtype, ckpt.text.dtype)
    load_weights(model, model_dir, ckpt.text_prefix, torch_dtype, optional)
    model.eval().requires_grad_(False)
    if pack and packing_supported(torch_dtype, model.device):
        pack_linears(model)
    return model, ckpt


def generation_defaults(model_dir: str | Path) -> dict:
    """Sampling defaults from generation_config.json (only when it asks for sampling)."""
    path = Path(model_dir) / "generation_config.json"
    g = read_json(path) if path.is_file() else {}
    if not g.get("do_sample"):
        return {}
    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    return {k: g[k] for k in keys if g.get(k) is not None}


class TextModel:
    def __init__(self, model_dir: str | Path, dtype: str | None = None):
        self.path = Path(model_dir)
        self.model, ckpt = load_text_model(model_dir, dtype, pack=True)
        self.config: TextConfig = ckpt.text
        self.tokenizer = Tokenizer(model_dir, ckpt.text.eos_token_ids)
        self.defaults = generation_defaults(model_dir)

    def params(self, **kw) -> SamplingParams:
        return SamplingParams(**{**self.defaults, **{k: v for k, v in kw.items() if v is not None}})

    def _ids(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def generate(self, prompt: str | list[int], **sampling) -> Completion:
        return generate(self.model, self.tokenizer, [self._ids(prompt)], self.params(**sampling))[0]

    def generate_batch(self, prompts: list[str | list[int]], **sampling) -> list[Completion]:
        return generate(self.model, self.tokenizer, [self._ids(p) for p in prompts], self.params(**sampling))

    def stream(self, prompt: str | list[int], **sampling) -> Iterator[str]:
        for d in stream(self.model, self.tokenizer, [self._ids(prompt)], self.params(**sampling)):
            if d.text:
                yield d.text

    def chat(self, messages: list[dict], **sampling) -> Completion:
        ids = self.tokenizer.encode_chat(messages)
        return generate(self.model, self.tokenizer, [ids], self.params(**sampling))[0]


def load(model_dir: str | Path, dtype: str | None = None) -> TextModel:
    return TextModel(model_dir, dtype)
