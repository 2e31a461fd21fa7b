"""The Python API: load a checkpoint folder; generate from text, or ask about documents.

import nanovl
m = nanovl.load("path/to/Llama-3.1-Nemotron-Nano-VL-8B-V1")
print(m.ask("invoice.pdf", "What is the total?").text)
for piece in m.stream(["page1.png", "page2.png"], "Compare the totals."): print(piece, end="")

t = nanovl.load("path/to/a-text-model")
t.generate("The capital of France is", max_new_tokens=8).text
t.chat([{"role": "user", "content": "Hi"}]).text
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from nanovl.config import TextConfig, load_config, read_json
from nanovl.engine import Completion, SamplingParams, generate, stream
from nanovl.engine.embed_store import EmbedStore
from nanovl.errors import CheckpointError, RequestError
from nanovl.media import DEFAULT_DPI, MAX_PIXELS, Page, Video, is_video, load_video, scan_document
from nanovl.models import text_model_class
from nanovl.models.vlm import VLMS, merge_embeddings
from nanovl.prompts import expand_media, media_question, video_text
from nanovl.quant.prepack import pack_linears, packing_supported, trim_heap
from nanovl.tiling import TilePlan, make_tiles, plan_tiles
from nanovl.tokenizer import Tokenizer
from nanovl.weights import checkpoint_index, load_weights, tensor_shapes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ENCODE_CHUNK = 8  # tiles per vision-encoder forward: bounds activation memory


def resolve_dtype(name: str | None, checkpoint_dtype: str) -> torch.dtype:
    """None/"auto" -> the checkpoint's dtype, except float16, which is slow on CPUs: bfloat16 instead."""
    name = checkpoint_dtype if name in (None, "auto") else name
    if name not in DTYPES:
        raise RequestError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return torch.bfloat16 if name == "float16" else DTYPES[name]


def load_text_model(model_dir: str | Path, dtype: str | None = None, pack: bool = False):
    """Build the language model of a checkpoint on `meta` and fill it from its safetensors.

    pack: CPU inference swaps (fast_cpu_modules): bf16 Linear layers prepacked for oneDNN, AWQ layers
    onto PyTorch's int4 kernel. The model is then for inference only.
    """
    ckpt = load_config(model_dir)
    cls = text_model_class(ckpt)
    index = checkpoint_index(model_dir)
    torch_dtype = resolve_dtype(dtype, ckpt.text.dtype)
    with torch.device("meta"):
        model = cls(ckpt.text)
        quantize_from_checkpoint(model, model_dir, ckpt.raw, index, ckpt.text_prefix, torch_dtype)
    optional = {"lm_head.weight": None} if ckpt.text.tie_word_embeddings else {}
    load_weights(model, model_dir, ckpt.text_prefix, torch_dtype, optional, index=index)
    model.eval().requires_grad_(False)
    if pack:
        fast_cpu_modules(model, torch_dtype)
    return model, ckpt


def load_vlm(model_dir: str | Path, dtype: str | None = None, pack: bool = False, align_corners: bool | None = None):
    """Build a whole vision-language checkpoint (encoder, projector, LLM) and load it strictly.

    align_corners: RADIO's position-grid interpolation switch (models/radio.py); None keeps the default.
    """
    ckpt = load_config(model_dir)
    cls = VLMS.get(ckpt.architecture)
    if cls is None:
        raise CheckpointError(f"{ckpt.architecture} is not a vision-language architecture ({', '.join(VLMS)})")
    index = checkpoint_index(model_dir)
    cfg = cls.from_checkpoint(ckpt.raw, ckpt.text, tensor_shapes(index), preprocessor_config(model_dir))
    if align_corners is not None:
        if not hasattr(cfg.vision, "align_corners"):
            raise RequestError(f"align_corners applies to RADIO encoders, not to {ckpt.architecture}")
        cfg.vision.align_corners = align_corners
    torch_dtype = resolve_dtype(dtype, ckpt.text.dtype)
    with torch.device("meta"):
        vlm = cls(cfg)
        quantize_from_checkpoint(vlm, model_dir, ckpt.raw, index, "", torch_dtype)  # the LLM, and the vision side
    load_weights(vlm, model_dir, "", torch_dtype, vlm.optional_weights(), cls.unused_weights, index)
    vlm.eval().requires_grad_(False)
    if pack:
        fast_cpu_modules(vlm.language_model, torch_dtype)
    return vlm, ckpt


def fast_cpu_modules(model, dtype: torch.dtype) -> None:
    """Inference-only swaps for CPU speed: AWQ int4 layers onto PyTorch's int4 kernel, bf16 Linear
    layers prepacked for oneDNN (quant/prepack.py)."""
    from nanovl.quant.prepack import repack_int4

    if model.device.type != "cpu":
        return
    repack_int4(model, dtype)
    if packing_supported(dtype, model.device):
        pack_linears(model)
    trim_heap()


def load_radio(model_dir: str | Path, prefix: str = "radio_model.", dtype: str = "float32", **overrides):
    """A RADIO encoder alone (a C-RADIO checkpoint folder, or transformers' RadioModel saved with
    save_pretrained, whose tensors carry the release names). overrides: RadioConfig fields."""
    from nanovl.models.radio import RadioConfig, RadioModel

    index = checkpoint_index(model_dir)
    cfg = RadioConfig.from_hf(read_json(Path(model_dir) / "config.json"), tensor_shapes(index), prefix)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    with torch.device("meta"):
        model = RadioModel(cfg)
    ic = "input_conditioner."
    optional = {ic + "norm_mean": None, ic + "norm_std": None}
    load_weights(model, model_dir, prefix, DTYPES[dtype], optional, RadioModel.UNUSED, index)
    return model.eval().requires_grad_(False)


def tile_spec(model_dir: str | Path):
    """How a vision-language checkpoint tiles images, from its config files alone (no weights)."""
    ckpt = load_config(model_dir)
    cls = VLMS.get(ckpt.architecture)
    if cls is None:
        raise CheckpointError(f"{ckpt.architecture} is not a vision-language architecture ({', '.join(VLMS)})")
    return cls.tile_spec(ckpt.raw, preprocessor_config(model_dir))


def quantize_from_checkpoint(model, model_dir, raw: dict, index: dict, prefix: str, dtype: torch.dtype):
    """Swap in the quantized modules the checkpoint's files describe (nanovl/quant/)."""
    from nanovl.quant import read_quant_config, swap_quantized_linears
    from nanovl.quant.int8_embeddings import swap_quantized_embeddings

    qcfg = read_quant_config(model_dir, raw)
    if qcfg is None:
        return
    if qcfg["int8_embeddings"]:
        swap_quantized_embeddings(model, set(index), prefix, dtype)
    swap_quantized_linears(model, qcfg, set(index), prefix)


def preprocessor_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "preprocessor_config.json"
    return read_json(path) if path.is_file() else {}


def generation_defaults(model_dir: str | Path) -> dict:
    """Sampling defaults from generation_config.json (only when it asks for sampling)."""
    path = Path(model_dir) / "generation_config.json"
    g = read_json(path) if path.is_file() else {}
    if not g.get("do_sample"):
        return {}
    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    return {k: g[k] for k in keys if g.get(k) is not None}


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


@dataclass
class ImageEmbeds:
    """Post-projector embeddings of one image computed elsewhere: (rows, hidden), rows a multiple of the
    tokens per tile. They take an image's place in the prompt; the vision encoder is skipped."""

    embeds: torch.Tensor


@dataclass
class ImagePrompt:
    """A question about documents, ready for the engine."""

    ids: list[int]
    embeds: torch.Tensor  # (len(ids), hidden): text embeddings with the image embeddings merged in
    plans: list[TilePlan]  # one per image (page) or video frame, in prompt order
    features: torch.Tensor  # (tiles, tokens, hidden) post-projector image embeddings


class VisionLanguageModel(TextModel):
    """A vision-language checkpoint: `ask` / `stream` about images and PDFs; text-only methods too."""

    def __init__(self, vlm, tokenizer: Tokenizer, path: Path):
        super().__init__(vlm.language_model, tokenizer, vlm.config.text, path)
        self.vlm = vlm
        self.tiles = vlm.config.tiles
        self.store: EmbedStore | None = None  # set by the server (or a caller) to reuse encodings
        self._model_id: str | None = None
        self.context_id = tokenizer.token_to_id(vlm.context_token)
        if self.context_id is None:
            raise CheckpointError(f"the tokenizer has no {vlm.context_token} token, which the image embeddings replace")

    @classmethod
    def load(cls, model_dir: str | Path, dtype: str | None = None, **options) -> VisionLanguageModel:
        vlm, ckpt = load_vlm(model_dir, dtype, pack=True, **options)
        return cls(vlm, Tokenizer(model_dir, ckpt.text.eos_token_ids), Path(model_dir))

    def load_images(
        self, inputs, pages=None, dpi=DEFAULT_DPI, max_pixels=MAX_PIXELS, frames=None, fps=None
    ) -> list[Image.Image | Video]:
        """Paths, bytes, data: URLs or PIL images (one or a list) -> RGB images, one per page; video
        files (by extension) -> a Video of sampled frames (`frames` evenly, or `fps`)."""
        media = self.scan_media(inputs, pages, dpi, max_pixels, frames, fps)
        return [m.load() if isinstance(m, Page) else m for m in media]

    def scan_media(
        self, inputs, pages=None, dpi=DEFAULT_DPI, max_pixels=MAX_PIXELS, frames=None, fps=None
    ) -> list[Page | Video]:
        """As `load_images`, but images and PDF pages stay `Page`s (sized from their headers, decoded
        or rendered when encoded), so a prompt too long for the context is refused before any
        rendering; `prepare` takes either."""
        if not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        media = []
        for src in inputs:
            if isinstance(src, Video):
                media.append(src)
            elif is_video(src):
                media.append(load_video(src, frames, fps, max_pixels=max_pixels))
            else:
                media += scan_document(src, pages, dpi, max_pixels)
        return media

    def prepare(
        self, media, question: str, max_tiles: int | None = None, system: str | None = None, reserve: int = 0
    ) -> ImagePrompt:
        """Tile, encode and merge. Without `max_tiles`, the per-image tile budget shrinks (with a note on
        stderr) until the prompt plus `reserve` new tokens fits the context; an explicit budget never
        changes, and a prompt that cannot fit is an error that gives the token counts. Each video
        frame is one tile."""
        kinds = ["video" if isinstance(m, Video) else "image" for m in media]
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": media_question(question, kinds)}
        ]
        return self.prepare_chat(messages, media, max_tiles, reserve)

    def prepare_chat(self, messages: list[dict], media, max_tiles: int | None = None, reserve: int = 0) -> ImagePrompt:
        """As `prepare`, for a whole conversation whose messages already hold one `<image>` / `<video>`
        placeholder per item of `media`, in order (the server builds these from content parts)."""
        if not media:
            raise RequestError("no images: give at least one image, PDF page or video")
        context = self.config.max_position_embeddings
        budget = self.tiles.max_tiles if max_tiles is None else max_tiles
        kinds = ["video" if isinstance(m, Video) else "image" for m in media]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        for m in media:
            if isinstance(m, ImageEmbeds):
                self.check_embeds(m.embeds)
        frame = TilePlan((1, 1), False, self.tiles.tokens_per_tile)
        while True:
            plans = [self.plans(m, budget, frame) for m in media]
            items = [(k, self.item_text(m, p)) for k, m, p in zip(kinds, media, plans)]
            ids = self.tokenizer.encode_rendered(expand_media(text, items))
            if len(ids) + max(reserve, 1) <= context:
                break
            if max_tiles is not None or budget <= self.tiles.min_tiles or "image" not in kinds:
                image_tokens = sum(p.image_tokens for ps in plans for p in ps)
                frames = sum(len(m.frames) for m in media if isinstance(m, Video))
                what = f"{kinds.count('image')} image(s) at up to {budget} tiles each" + (
                    f" and {frames} video frame(s)" if frames else ""
                )
                raise RequestError(
                    f"{what} take {image_tokens} tokens; with the text that is {len(ids)} prompt tokens "
                    f"(+{reserve} to generate), over the context of {context}"
                )
            budget -= 1
        if max_tiles is None and budget < self.tiles.max_tiles:
            n = kinds.count("image")
            print(f"nanovl: note: up to {budget} tiles per image to fit {n} images in the context", file=sys.stderr)

        features = self.encode_media(media, plans)
        ids_t = torch.tensor(ids)
        with torch.inference_mode():
            text_embeds = self.model.embed(ids_t[None])[0]
            embeds = merge_embeddings(text_embeds, ids_t, self.context_id, features.flatten(0, 1))
        return ImagePrompt(ids, embeds, [p for ps in plans for p in ps], features)

    def plans(self, item, budget: int, frame: TilePlan) -> list[TilePlan]:
        if isinstance(item, Video):
            return [frame] * len(item.frames)
        if isinstance(item, ImageEmbeds):
            return [TilePlan((len(item.embeds) // self.tiles.tokens_per_tile, 1), False, self.tiles.tokens_per_tile)]
        return [plan_tiles(self.tiles, *item.size, max_tiles=budget)]

    def check_embeds(self, e: torch.Tensor):
        tpt, hidden = self.tiles.tokens_per_tile, self.config.hidden_size
        if self.vlm.context_token != "<image>":
            raise RequestError(
                f"{self.vlm.config.architecture} takes no precomputed image embeddings (its tile tags need the grid)"
            )
        if e.ndim != 2 or e.shape[1] != hidden or e.shape[0] == 0 or e.shape[0] % tpt:
            raise RequestError(
                f"image_embeds must be (rows, {hidden}) with rows a multiple of {tpt}; got {list(e.shape)}"
            )
        if not torch.isfinite(e).all():
            raise RequestError("image_embeds holds NaN or infinite values")

    def encode_media(self, media, plans) -> torch.Tensor:
        """Post-projector embeddings of every image / frame, in order (tiles, tokens, hidden); from the
        store where it has them, the vision encoder for the rest. One image at a time: a `Page` is
        decoded or rendered only here, and its pixels are dropped once it is encoded."""
        from nanovl.engine.embed_store import image_key, model_fingerprint

        if self.store is not None and self._model_id is None:
            self._model_id = model_fingerprint(self.path)
        tpt, hidden = self.tiles.tokens_per_tile, self.config.hidden_size
        out: list[torch.Tensor | None] = []
        pending: list[tuple[int, str | None, torch.Tensor]] = []  # (place in out, store key, tiles)

        def flush():  # encode the pending tiles together (at least ENCODE_CHUNK of them, or the rest)
            feats = self.encode_tiles(torch.cat([t for _, _, t in pending])).split([len(t) for _, _, t in pending])
            for (i, key, _), f in zip(pending, feats):
                if key is not None:
                    self.store.put(key, f)
                out[i] = f
            pending.clear()

        for m, ps in zip(media, plans):
            if isinstance(m, ImageEmbeds):
                out.append(m.embeds.view(-1, tpt, hidden))
                continue
            for im, p in zip(m.frames if isinstance(m, Video) else [m], ps):
                im = im.load() if isinstance(im, Page) else im
                key = image_key(im, p, self.tiles, self._model_id) if self.store is not None else None
                out.append(self.store.get(key, (p.tiles, tpt, hidden)) if key is not None else None)
                if out[-1] is None:
                    pending.append((len(out) - 1, key, make_tiles(im, self.tiles, p)))
                    if sum(len(t) for _, _, t in pending) >= ENCODE_CHUNK:
                        flush()
                del im
        if pending:
            flush()
        return torch.cat([o.to(self.model.dtype) for o in out])

    def item_text(self, item, plans: list[TilePlan]) -> str:
        if isinstance(item, ImageEmbeds):
            return self.vlm.image_text(plans[0])
        if isinstance(item, Video):
            return video_text(self.vlm.image_text(plans[0]), item.timestamps, len(item.frames))
        return self.vlm.image_text(plans[0])

    @torch.inference_mode()
    def encode_tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, S, S) -> post-projector embeddings (tiles, tokens, hidden), a chunk at a time."""
        return torch.cat([self.vlm.encode_images(chunk) for chunk in pixels.split(ENCODE_CHUNK)])

    def _request(self, inputs, question, pages, max_tiles, dpi, system, frames, fps, think, sampling):
        params = self.params(**sampling)
        media = self.load_images(inputs, pages, dpi, frames=frames, fps=fps)
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
    if arch in VLMS:
        return VisionLanguageModel.load(model_dir, dtype, **options)
    if options:
        raise RequestError(f"{', '.join(options)}: options for vision-language checkpoints only")
    return TextModel.load(model_dir, dtype)
