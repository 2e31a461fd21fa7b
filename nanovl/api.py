"""The Python API: the user-facing handles of a loaded checkpoint.

import nanovl
m = nanovl.load("path/to/Llama-3.1-Nemotron-Nano-VL-8B-V1")
print(m.ask("invoice.pdf", "What is the total?").text)
for piece in m.stream(["page1.png", "page2.png"], "Compare the totals."): print(piece, end="")

t = nanovl.load("path/to/a-text-model")
t.generate("The capital of France is", max_new_tokens=8).text
t.chat([{"role": "user", "content": "Hi"}]).text

Loading lives in checkpoint.py, the media -> prompt -> embeddings path in processor.py, generation
in engine/; a handle ties them together.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from nanovl.checkpoint import generation_defaults, load_config, load_text_model, load_vlm
from nanovl.config import TextConfig
from nanovl.engine import Completion, SamplingParams, generate, stream
from nanovl.errors import RequestError
from nanovl.media import DEFAULT_DPI, MAX_PIXELS, Page, Video
from nanovl.models import is_vlm
from nanovl.processor import ImagePrompt, Processor, scan_media
from nanovl.tokenizer import Tokenizer


class TextModel:
    """A language model and its tokenizer: raw continuation, chat, batches."""

    def __init__(self, model, tokenizer: Tokenizer, config: TextConfig, path: Path):
        self.model, self.tokenizer, self.config, self.path = model, tokenizer, config, path
        self.defaults = generation_defaults(path)

    @classmethod
    def load(cls, model_dir: str | Path, dtype: str | None = None) -> TextModel:
        model, ckpt = load_text_model(model_dir, dtype, pack=True)
        return cls(model, Tokenizer(model_dir, ckpt.text.eos_token_ids), ckpt.text, Path(model_dir))

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

    def chat(self, messages: list[dict], think: bool | None = None, **sampling) -> Completion:
        if think is not None:
            system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
            rest = messages[1:] if system is not None else messages
            messages = [{"role": "system", "content": reasoning_system(system, think)}, *rest]
        ids = self.tokenizer.encode_chat(messages)
        return generate(self.model, self.tokenizer, [ids], self.params(**sampling))[0]


class VisionLanguageModel(TextModel):
    """A vision-language checkpoint: `ask` / `stream` about images and PDFs; text-only methods too."""

    def __init__(self, vlm, tokenizer: Tokenizer, path: Path):
        super().__init__(vlm.language_model, tokenizer, vlm.config.text, path)
        self.vlm = vlm
        self.processor = Processor(vlm, tokenizer, path)
        self.tiles, self.context_id = self.processor.tiles, self.processor.context_id

    @classmethod
    def load(cls, model_dir: str | Path, dtype: str | None = None, **options) -> VisionLanguageModel:
        vlm, ckpt = load_vlm(model_dir, dtype, pack=True, **options)
        return cls(vlm, Tokenizer(model_dir, ckpt.text.eos_token_ids), Path(model_dir))

    def use_onnx_vision(self, folder: str | Path | None = None, int8: bool = False):
        """Run the vision path through onnxruntime: the graph `nanovl export onnx` wrote to FOLDER
        (default: the checkpoint's onnx/), checked against this checkpoint."""
        from nanovl.onnx_export import OnnxVision

        folder = Path(folder) if folder else self.path / "onnx"
        self.processor.encoder = OnnxVision(folder, self.path, self.processor.tiles, self.config.hidden_size, int8)
        return self

    def load_images(
        self, inputs, pages=None, dpi=DEFAULT_DPI, max_pixels=MAX_PIXELS, frames=None, fps=None
    ) -> list:
        """Paths, bytes, data: URLs or PIL images (one or a list) -> RGB images, one per page; video
        files (by extension) -> a Video of sampled frames (`frames` evenly, or `fps`)."""
        media = scan_media(inputs, pages, dpi, max_pixels, frames, fps)
        return [m.load() if isinstance(m, Page) else m for m in media]

    def scan_media(
        self, inputs, pages=None, dpi=DEFAULT_DPI, max_pixels=MAX_PIXELS, frames=None, fps=None
    ) -> list[Page | Video]:
        """As `load_images`, but images and PDF pages stay `Page`s, decoded or rendered when encoded."""
        return scan_media(inputs, pages, dpi, max_pixels, frames, fps)

    def prepare(self, media, question: str, max_tiles: int | None = None, system: str | None = None,
                reserve: int = 0) -> ImagePrompt:  # fmt: skip
        """Tile, encode and merge (processor.Processor.prepare)."""
        return self.processor.prepare(media, question, max_tiles, system, reserve)

    def _request(self, inputs, question, pages, max_tiles, dpi, system, frames, fps, think, sampling):
        params = self.params(**sampling)
        media = scan_media(inputs, pages, dpi, frames=frames, fps=fps)
        prompt = self.prepare(media, question, max_tiles, reasoning_system(system, think), params.max_new_tokens)
        return prompt, params

    def stream(self, inputs, question: str, pages=None, max_tiles=None, dpi=DEFAULT_DPI, system=None,
               frames=None, fps=None, think=None, **sampling) -> Iterator[str]:  # fmt: skip
        """Text pieces of the answer as they are generated; arguments as for `ask`."""
        prompt, params = self._request(inputs, question, pages, max_tiles, dpi, system, frames, fps, think, sampling)
        for d in stream(self.model, self.tokenizer, [prompt.ids], params, embeds=[prompt.embeds]):
            if d.text:
                yield d.text

    def ask(self, inputs, question: str, pages=None, max_tiles=None, dpi=DEFAULT_DPI, system=None,
            frames=None, fps=None, think=None, **sampling) -> Completion:  # fmt: skip
        """One completion about images / PDFs / videos (paths, bytes, data: URLs or PIL images).
        pages/dpi: PDF pages and render resolution; max_tiles: per-image budget; frames/fps: video
        sampling; think=True|False adds /think or /no_think to the system prompt of reasoning models,
        whose completion then has .reasoning and .answer; sampling: SamplingParams fields."""
        prompt, params = self._request(inputs, question, pages, max_tiles, dpi, system, frames, fps, think, sampling)
        return generate(self.model, self.tokenizer, [prompt.ids], params, embeds=[prompt.embeds])[0]


    def extract(self, document, schema: dict | None = None, fields=None, pages=None, dpi=DEFAULT_DPI,
                max_tiles=None, max_new_tokens: int | None = None, calibration=None) -> dict:  # fmt: skip
        """Fields of one document (a path, bytes, ...) as JSON: `schema` (a JSON schema object) or
        `fields` ("total,date" or a list: strings); each leaf comes back as {"value", "confidence",
        "evidence"} (documents/extract.py)."""
        from nanovl.documents.backends import LocalBackend
        from nanovl.documents.extract import check_extract_schema, extract, fields_schema

        if (schema is None) == (fields is None):
            raise RequestError("give schema= or fields=, one of them")
        schema = check_extract_schema(schema) if schema is not None else fields_schema(fields)
        return extract(LocalBackend(self), document, schema, pages, dpi, max_tiles, max_new_tokens, calibration)


def reasoning_system(system: str | None, think: bool | None) -> str | None:
    """The system prompt with /think or /no_think on its first line (reasoning models); None: as given."""
    if think is None:
        return system
    return "\n".join(x for x in ("/think" if think else "/no_think", system) if x)


def load(model_dir: str | Path, dtype: str | None = None, **options) -> TextModel | VisionLanguageModel:
    """A checkpoint folder -> a VisionLanguageModel for VLM architectures, else a TextModel.

    options (VLMs): align_corners=True|False for RADIO's position-grid resize (default False, as vLLM
    and current RADIO; the C-RADIOv2-H remote code reportedly used True).
    """
    arch = load_config(model_dir).architecture
    if is_vlm(arch):
        return VisionLanguageModel.load(model_dir, dtype, **options)
    if options:
        raise RequestError(f"{', '.join(options)}: options for vision-language checkpoints only")
    return TextModel.load(model_dir, dtype)
