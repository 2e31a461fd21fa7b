"""The VLM processor: media -> tile plans -> prompt text with the family's image text -> pixels ->
embeddings (with the store) -> merged inputs. The Python API, the CLI, the server, eval and training
all take this one path, so the same file gives the same pixels and tokens everywhere.

- `scan_media`: paths, bytes, data: URLs or PIL images -> `Page`s (sized from headers and page boxes,
  decoded or rendered only when encoded) and `Video`s; a prompt too long for the context is refused
  before any page is rendered.
- Tile budgets: `Processor.prepare_chat` lowers the per-image budget until the prompt fits the context
  (an explicit budget never changes); training lowers it until a sample's tiles fit its tile budget
  (`plan_images`). Both go down the same ladder, from the budget to the rule's minimum.
- Prompt text: one `<image>` / `<video>` placeholder per item, replaced after the chat template by the
  family's image text (prompts.py); a `<document>` placeholder stands for one `<image>` per page
  (`expand_documents`).
- Encoding: one image at a time (a `Page`'s pixels are dropped once encoded), the encoder in chunks of
  ENCODE_CHUNK tiles, results from and into the embedding store when there is one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nanovl.errors import CheckpointError, RequestError
from nanovl.media import DEFAULT_DPI, MAX_PIXELS, Page, Video, is_video, load_video, scan_document
from nanovl.models.vlm import merge_embeddings
from nanovl.prompts import PLACEHOLDERS, expand_media, media_question, video_text
from nanovl.tiling import TilePlan, TileSpec, make_tiles, plan_tiles

log = logging.getLogger("nanovl")
ENCODE_CHUNK = 8  # tiles per vision-encoder forward: bounds activation memory
DOCUMENT = "<document>"  # a file part of a chat message: one <image> per page it yields


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


def scan_source(src, pages=None, dpi=DEFAULT_DPI, max_pixels=MAX_PIXELS, frames=None, fps=None,
                max_pages: int | None = None, video: bool | None = None) -> list[Page | Video]:  # fmt: skip
    """One input -> its media: a video (`video`, or None: by file extension) -> one Video of sampled
    frames (`frames` evenly, or `fps`); an image -> one Page; a PDF -> a Page per selected page (at
    most `max_pages`)."""
    if isinstance(src, Video):
        return [src]
    if video or (video is None and is_video(src)):
        return [load_video(src, frames, fps, max_pixels=max_pixels)]
    return scan_document(src, pages, dpi, max_pixels, max_pages=max_pages)


def scan_media(inputs, pages=None, dpi=DEFAULT_DPI, max_pixels=MAX_PIXELS, frames=None, fps=None) -> list[Page | Video]:
    """One input or a list of them -> their media, in order (see `scan_source`)."""
    if not isinstance(inputs, (list, tuple)):
        inputs = [inputs]
    return [m for src in inputs for m in scan_source(src, pages, dpi, max_pixels, frames, fps)]


def expand_documents(messages: list[dict], counts: list[int]) -> list[dict]:
    """Each `<document>` placeholder of the messages, in order, becomes one `<image>` per page of its
    document (counts[k] pages for the k-th); other placeholders stay."""
    it = iter(counts)
    out = []
    for m in messages:
        parts = m["content"].split(DOCUMENT)
        out.append({**m, "content": parts[0] + "".join(PLACEHOLDERS["image"] * next(it) + rest for rest in parts[1:])})
    return out


def budget_ladder(tiles: TileSpec, budget: int | None, fits: Callable[[int], object], fixed: bool):
    """fits(b) for b = budget, budget - 1, ... down to the rule's minimum: the first truthy result and
    the budget that gave it; with `fixed`, only `budget`. (None, last budget tried) when none fits."""
    budget = tiles.max_tiles if budget is None else budget
    while True:
        result = fits(budget)
        if result or fixed or budget <= tiles.min_tiles:
            return result, budget
        budget -= 1


def plan_images(tiles: TileSpec, sizes: list[tuple[int, int]], max_tiles: int | None, sample_tiles: int | None):
    """Training's tile plans: at most max_tiles per image and, with a per-sample budget, the per-image
    budget lowered until all images together fit it (thumbnails count). None when they cannot."""

    def fits(b):
        plans = [plan_tiles(tiles, *size, max_tiles=b) for size in sizes]
        return plans if sample_tiles is None or sum(p.tiles for p in plans) <= sample_tiles else None

    return budget_ladder(tiles, max_tiles, fits, fixed=False)[0]


def image_pixels(page: Page, tiles: TileSpec, plan: TilePlan) -> torch.Tensor:
    """A page's tiles (tiles, 3, S, S) for `plan`, decoded as inference decodes it (media.load_image)."""
    return make_tiles(page.load(), tiles, plan)


class Processor:
    """The prompt and embedding side of one vision-language model (a VisionLanguageModule).
    store: an EmbedStore to reuse encodings (the server's); path: the checkpoint, for store keys."""

    def __init__(self, vlm, tokenizer, path: Path | None = None, store=None):
        self.vlm, self.tokenizer, self.path, self.store = vlm, tokenizer, path, store
        self.tiles: TileSpec = vlm.config.tiles
        self.hidden = vlm.config.text.hidden_size
        self._model_id: str | None = None
        self.encoder = None  # another runtime for the vision path (onnx_export.OnnxVision); None: the module's
        self.context_id = tokenizer.token_to_id(vlm.context_token)
        if self.context_id is None:
            raise CheckpointError(f"the tokenizer has no {vlm.context_token} token, which the image embeddings replace")

    def prepare(self, media, question: str, max_tiles: int | None = None, system: str | None = None,
                reserve: int = 0) -> ImagePrompt:  # fmt: skip
        """Tile, encode and merge. Without `max_tiles`, the per-image tile budget shrinks (with a logged
        note) until the prompt plus `reserve` new tokens fits the context; an explicit budget never
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
        context = self.vlm.config.text.max_position_embeddings
        kinds = ["video" if isinstance(m, Video) else "image" for m in media]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        for m in media:
            if isinstance(m, ImageEmbeds):
                self.check_embeds(m.embeds)
        attempt = {}

        def fits(budget):
            plans = [self.plans(m, budget) for m in media]
            items = [(k, self.item_text(m, p)) for k, m, p in zip(kinds, media, plans)]
            attempt.update(plans=plans, ids=self.tokenizer.encode_rendered(expand_media(text, items)))
            return len(attempt["ids"]) + max(reserve, 1) <= context

        fixed = max_tiles is not None or "image" not in kinds
        ok, budget = budget_ladder(self.tiles, max_tiles, fits, fixed)
        plans, ids = attempt["plans"], attempt["ids"]
        if not ok:
            image_tokens = sum(p.image_tokens for ps in plans for p in ps)
            frames = sum(len(m.frames) for m in media if isinstance(m, Video))
            what = f"{kinds.count('image')} image(s) at up to {budget} tiles each" + (
                f" and {frames} video frame(s)" if frames else ""
            )
            raise RequestError(
                f"{what} take {image_tokens} tokens; with the text that is {len(ids)} prompt tokens "
                f"(+{reserve} to generate), over the context of {context}"
            )
        if max_tiles is None and budget < self.tiles.max_tiles:
            log.warning("nanovl: note: up to %d tiles per image to fit %d images in the context", budget,
                        kinds.count("image"))  # fmt: skip
        features = self.encode_media(media, plans)
        ids_t = torch.tensor(ids)
        with torch.inference_mode():
            text_embeds = self.vlm.language_model.embed(ids_t[None])[0]
            embeds = merge_embeddings(text_embeds, ids_t, self.context_id, features.flatten(0, 1))
        return ImagePrompt(ids, embeds, [p for ps in plans for p in ps], features)

    def plans(self, item, budget: int) -> list[TilePlan]:
        """An item's tile plans: one per page, one one-tile plan per video frame."""
        tpt = self.tiles.tokens_per_tile
        if isinstance(item, Video):
            return [TilePlan((1, 1), False, tpt)] * len(item.frames)
        if isinstance(item, ImageEmbeds):
            return [TilePlan((len(item.embeds) // tpt, 1), False, tpt)]
        return [plan_tiles(self.tiles, *item.size, max_tiles=budget)]

    def item_text(self, item, plans: list[TilePlan]) -> str:
        """The token text an item's placeholder becomes."""
        if isinstance(item, Video):
            return video_text(self.vlm.image_text(plans[0]), item.timestamps, len(item.frames))
        return self.vlm.image_text(plans[0])

    def check_embeds(self, e: torch.Tensor):
        tpt = self.tiles.tokens_per_tile
        if self.vlm.context_token != "<image>":
            raise RequestError(
                f"{self.vlm.config.architecture} takes no precomputed image embeddings (its tile tags need the grid)"
            )
        if e.ndim != 2 or e.shape[1] != self.hidden or e.shape[0] == 0 or e.shape[0] % tpt:
            raise RequestError(
                f"image_embeds must be (rows, {self.hidden}) with rows a multiple of {tpt}; got {list(e.shape)}"
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
        tpt = self.tiles.tokens_per_tile
        out: list[torch.Tensor | None] = []
        pending: list[tuple[int, str | None, torch.Tensor]] = []  # (place in out, store key, tiles)

        def flush():  # encode the pending tiles together (at least ENCODE_CHUNK of them, or the rest)
            feats = self.encode_tiles(torch.cat([t for _, _, t in pending])).to(self.vlm.language_model.dtype)
            feats = feats.split([len(t) for _, _, t in pending])
            for (i, key, _), f in zip(pending, feats):
                if key is not None:
                    self.store.put(key, f)
                out[i] = f
            pending.clear()

        for m, ps in zip(media, plans):
            if isinstance(m, ImageEmbeds):
                out.append(m.embeds.view(-1, tpt, self.hidden))
                continue
            for im, p in zip(m.frames if isinstance(m, Video) else [m], ps):
                im = im.load() if isinstance(im, Page) else im
                key = image_key(im, p, self.tiles, self._model_id) if self.store is not None else None
                out.append(self.store.get(key, (p.tiles, tpt, self.hidden)) if key is not None else None)
                if out[-1] is None:
                    pending.append((len(out) - 1, key, make_tiles(im, self.tiles, p)))
                    if sum(len(t) for _, _, t in pending) >= ENCODE_CHUNK:
                        flush()
                del im
        if pending:
            flush()
        return torch.cat([o.to(self.vlm.language_model.dtype) for o in out])  # stored or given embeddings too

    @torch.inference_mode()
    def encode_tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, S, S) -> post-projector embeddings (tiles, tokens, hidden), a chunk at a time."""
        encode = self.encoder or self.vlm.encode_images
        return torch.cat([encode(chunk) for chunk in pixels.split(ENCODE_CHUNK)])
