"""The vision-language models: vision encoder -> pixel shuffle -> mlp1 -> the LLM's input embeddings.

- `Llama_Nemotron_Nano_VL` (Llama-3.1-Nemotron-Nano-VL-8B-V1): C-RADIO + LayerNorm/GELU mlp1 with
  biases + Llama-3.1. Tiles of 512 by the nano_vl grid rule, normalised inside RADIO. Each image is
  `<img>` + `<image>` x (tiles * 256) + `</img>`; `<image>` is the context token.
- `NVLM_D` (NVLM-D-72B): InternViT + bias-free LayerNorm/GELU mlp1 + Qwen2. Tiles of 448 by the
  InternVL rule, ImageNet-normalised in the processor. Each image is `<Image>`, then per tile a tag
  (`<tile_1>` ... and `<tile_global_thumbnail>` for the thumbnail) followed by 256 `<|vision_pad|>`,
  then `</Image>`.
Image embeddings replace the context tokens in order (tiles in processor order, thumbnail last).
Everything a family reads from the checkpoint is read here; a value it must have and cannot find
stops loading with the name of the missing field, and a documented default is announced, not silent.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from nanovl.config import TextConfig
from nanovl.errors import CheckpointError
from nanovl.models.intern_vit import InternVisionModel, InternViTConfig
from nanovl.models.llama import LlamaForCausalLM
from nanovl.models.nemotron_h import NemotronHForCausalLM
from nanovl.models.projector import mlp1_nano_vl, mlp1_nano_vl_v2, mlp1_nvlm, pixel_shuffle
from nanovl.models.qwen2 import Qwen2ForCausalLM
from nanovl.models.radio import CLIP_MEAN, CLIP_STD, RadioConfig, RadioModel
from nanovl.tiling import IMAGENET_MEAN, IMAGENET_STD, TilePlan, TileSpec


@dataclass
class VLMConfig:
    architecture: str
    text: TextConfig
    vision: RadioConfig | InternViTConfig
    tiles: TileSpec
    downsample_ratio: float
    ps_version: str
    projector_hidden_size: int


def _first(sources: list[tuple[str, dict]], key: str, default, what: str):
    """The first of `key` in the given (name, dict) sources; the default is announced, never silent."""
    for _, d in sources:
        if d.get(key) is not None:
            return d[key]
    names = " or ".join(name for name, _ in sources)
    warnings.warn(f"{key} not found in {names}; using {default}, the {what} default", stacklevel=3)
    return default


def tile_geometry(raw: dict, default_patch: int) -> tuple[int, int]:
    """(tile size, tokens per tile) from config.json: force_image_size (or the vision config's
    image_size), the vision patch size and the pixel-shuffle downsample ratio."""
    v = raw.get("vision_config") or {}
    size = raw.get("force_image_size") or v.get("image_size")
    if not size:
        raise CheckpointError("config.json has neither force_image_size nor vision_config.image_size")
    patch = v.get("patch_size", default_patch)
    return size, int((size // patch) ** 2 * raw.get("downsample_ratio", 0.5) ** 2)


class VisionLanguageModule(nn.Module):
    """Shared glue; subclasses set the parts and the prompt format."""

    context_token: str  # the token the image embeddings replace
    text_class: type
    vision_prefix: str  # weight-name prefix of the encoder inside the checkpoint
    tile_rule: str  # tiling.py's grid rule
    patch_size: int  # the encoder's patch when the vision config names none
    family: str  # the release, in warnings about documented defaults

    vision_tower: type  # the encoder module, built from cfg.vision
    projector: staticmethod  # mlp1 builder: (pixel-shuffled width, projector hidden, LLM hidden) -> module

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.config = cfg
        self.language_model = self.text_class(cfg.text)
        self.vision_model = self.vision_tower(cfg.vision)
        width = cfg.vision.hidden_size * round(1 / cfg.downsample_ratio) ** 2  # after the pixel shuffle
        self.mlp1 = self.projector(width, cfg.projector_hidden_size, cfg.text.hidden_size)

    @classmethod
    def from_checkpoint(cls, raw: dict, text: TextConfig, shapes: dict, pre: dict) -> VLMConfig:
        tiles = cls.tile_spec(raw, pre)
        proj = shapes.get("mlp1.1.weight")
        if proj is None:
            raise CheckpointError("checkpoint lacks mlp1.1.weight (the projector)")
        return VLMConfig(
            architecture=raw["architectures"][0],
            text=text,
            vision=cls.vision_config(raw, shapes),
            tiles=tiles,
            downsample_ratio=raw.get("downsample_ratio", 0.5),
            ps_version=_first([("config.json", raw)], "ps_version", "v1", "InternVL config class"),
            projector_hidden_size=proj[0],
        )

    @classmethod
    def tile_spec(cls, raw: dict, pre: dict) -> TileSpec:
        """How the checkpoint tiles images, from config.json and preprocessor_config.json."""
        size, tokens = tile_geometry(raw, cls.patch_size)
        sources, min_tiles, max_tiles = cls.tile_limits(raw, pre)
        return TileSpec(rule=cls.tile_rule, tile_size=size, min_tiles=min_tiles, max_tiles=max_tiles,
                        use_thumbnail=_first(sources, "use_thumbnail", True, cls.family), tokens_per_tile=tokens,
                        **cls.normalisation(raw))  # fmt: skip

    @classmethod
    def tile_limits(cls, raw: dict, pre: dict) -> tuple[list[tuple[str, dict]], int, int]:
        """(where to read use_thumbnail, min tiles, max tiles), as the family's processor reads them."""
        sources = [("config.json", raw)]
        return sources, raw.get("min_dynamic_patch") or 1, _first(sources, "max_dynamic_patch", 12, cls.family)

    @staticmethod
    def normalisation(raw: dict) -> dict:
        """TileSpec fields for the processor's pixel normalisation (none: the encoder's own)."""
        return {}

    @classmethod
    def config_shapes(cls, raw: dict, text: TextConfig) -> dict:
        """The tensor shapes `from_checkpoint` reads, derived from config.json alone (to build a random
        checkpoint of this family without one)."""
        return {"mlp1.1.weight": (raw.get("projector_hidden_size") or text.intermediate_size, 0)}

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, S, S) -> pre-projector features after pixel shuffle (tiles, tokens, 4C)."""
        feats = self.vision_model(pixels)
        return pixel_shuffle(feats, self.config.downsample_ratio, self.config.ps_version)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """pre-projector features -> LLM input embeddings (tiles, tokens, hidden)."""
        return self.mlp1(feats.to(self.mlp1[0].weight.dtype))  # the norm's: a quantized Linear has no float weight

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.project(self.vision_features(pixels))

    def optional_weights(self) -> dict:
        """Model tensors a checkpoint may omit -> the value to use (None: tied, nothing to fill)."""
        return {"language_model.lm_head.weight": None} if self.config.text.tie_word_embeddings else {}

    def tie_weights(self):
        self.language_model.tie_weights()


class RadioTower(nn.Module):
    """Holds RADIO under the release's name `radio_model`."""

    def __init__(self, cfg: RadioConfig):
        super().__init__()
        self.radio_model = RadioModel(cfg)

    def forward(self, pixels):
        return self.radio_model(pixels)


class NemotronNanoVL(VisionLanguageModule):
    """Llama_Nemotron_Nano_VL: RADIO + Llama-3.1."""

    context_token = "<image>"
    text_class = LlamaForCausalLM
    vision_prefix = "vision_model.radio_model."
    unused_weights = RadioModel.UNUSED
    tile_rule, patch_size, family = "nano_vl", 16, "Nano-VL-8B"
    vision_tower, projector = RadioTower, staticmethod(mlp1_nano_vl)

    @classmethod
    def tile_limits(cls, raw: dict, pre: dict):
        sources = [("preprocessor_config.json", pre), ("config.json", raw)]
        max_tiles = pre.get("max_num_tiles") or _first(sources, "max_dynamic_patch", 12, cls.family)
        return sources, pre.get("min_num_tiles") or raw.get("min_dynamic_patch") or 1, max_tiles

    @classmethod
    def config_shapes(cls, raw: dict, text: TextConfig) -> dict:
        v = raw["vision_config"]
        pg, grid = cls.vision_prefix + "model.patch_generator.", v["args"]["cpe_max_size"] // v["patch_size"]
        return {
            **super().config_shapes(raw, text),
            pg + "cls_token.token": (8, v["hidden_size"]),  # 4 CLS + 4 registers, as C-RADIOv2-H
            pg + "pos_embed": (1, grid * grid, v["hidden_size"]),
        }

    @staticmethod
    def vision_config(raw: dict, shapes: dict) -> RadioConfig:
        return RadioConfig.from_hf(raw.get("vision_config") or {}, shapes, "vision_model.radio_model.")

    def image_text(self, plan: TilePlan) -> str:
        return "<img>" + "<image>" * plan.image_tokens + "</img>"

    def optional_weights(self) -> dict:
        ic = "vision_model.radio_model.input_conditioner."
        clip = {
            ic + "norm_mean": torch.tensor(CLIP_MEAN).view(3, 1, 1),
            ic + "norm_std": torch.tensor(CLIP_STD).view(3, 1, 1),
        }
        return {**super().optional_weights(), **clip}


class NVLMD(VisionLanguageModule):
    """NVLM_D: InternViT + Qwen2."""

    context_token = "<|vision_pad|>"
    text_class = Qwen2ForCausalLM
    vision_prefix = "vision_model."
    unused_weights = ()
    tile_rule, patch_size, family = "internvl", 14, "NVLM-D"
    vision_tower, projector = InternVisionModel, staticmethod(mlp1_nvlm)

    @classmethod
    def tile_limits(cls, raw: dict, pre: dict):
        sources = [("config.json", raw)]
        if not raw.get("dynamic_image_size", True):
            return sources, 1, 1
        return sources, raw.get("min_dynamic_patch") or 1, _first(sources, "max_dynamic_patch", 6, cls.family)

    @staticmethod
    def normalisation(raw: dict) -> dict:
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}

    @staticmethod
    def vision_config(raw: dict, shapes: dict) -> InternViTConfig:
        return InternViTConfig.from_hf(raw.get("vision_config") or {}, raw.get("select_layer", -1))

    def image_text(self, plan: TilePlan) -> str:
        # The last tile is the thumbnail when the checkpoint uses one, and a single tile is tagged as
        # the thumbnail too (vLLM's NVLM processor does the same).
        n = plan.tiles
        if self.config.tiles.use_thumbnail:
            tags = [f"<tile_{k}>" for k in range(1, n)] + ["<tile_global_thumbnail>"]
        else:
            tags = [f"<tile_{k}>" for k in range(1, n + 1)]
        pad = self.context_token * plan.tokens_per_tile
        return "<Image>" + "".join(tag + pad for tag in tags) + "</Image>"


class NemotronNanoVLV2(NemotronNanoVL):
    """NemotronH_Nano_VL_V2 (NVIDIA-Nemotron-Nano-VL-12B-V2): RADIO + RMSNorm/ReLU^2 mlp1 + Nemotron-H.
    Tiles by the InternVL rule, resized in torch (bicubic, antialias), normalised in the processor
    with the config's norm_mean / norm_std (the encoder runs without RADIO's conditioner)."""

    text_class = NemotronHForCausalLM
    unused_weights = RadioModel.UNUSED + (r"radio_model\.input_conditioner\.",)  # vLLM skips them too
    tile_rule, family = "internvl", "Nano-VL-12B-V2"
    projector = staticmethod(mlp1_nano_vl_v2)

    @staticmethod
    def vision_config(raw: dict, shapes: dict) -> RadioConfig:
        cfg = RadioConfig.from_hf(raw.get("vision_config") or {}, shapes, "vision_model.radio_model.")
        cfg.conditioner = False  # the processor normalises
        return cfg

    @classmethod
    def tile_limits(cls, raw: dict, pre: dict):
        sources = [("config.json", raw), ("preprocessor_config.json", pre)]
        return sources, raw.get("min_dynamic_patch") or 1, _first(sources, "max_dynamic_patch", 12, cls.family)

    @staticmethod
    def normalisation(raw: dict) -> dict:
        missing = [k for k in ("norm_mean", "norm_std") if not raw.get(k)]
        if missing:
            raise CheckpointError(f"config.json lacks {' and '.join(missing)}, which the V2 processor normalises with")
        return {"mean": tuple(raw["norm_mean"]), "std": tuple(raw["norm_std"]), "resize": "torch"}

    def optional_weights(self) -> dict:
        return VisionLanguageModule.optional_weights(self)


def merge_embeddings(text_embeds: torch.Tensor, ids: torch.Tensor, context_id: int, image_embeds: torch.Tensor):
    """text_embeds: (T, C) or (B, T, C); ids: (T,) or (B, T); image_embeds: (K, C) with K = count of
    context_id in ids, placed in row-major order. Differentiable (training merges with it too)."""
    mask = ids == context_id
    if int(mask.sum()) != image_embeds.shape[0]:
        raise ValueError(f"{int(mask.sum())} image context tokens for {image_embeds.shape[0]} image embeddings")
    out = text_embeds.clone()
    out[mask] = image_embeds.to(out.dtype)
    return out
