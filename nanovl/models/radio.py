"""C-RADIOv2-H: the vision encoder of both Nemotron Nano VL models.

- A plain pre-norm ViT (LayerNorm eps 1e-6, fused qkv with bias, exact-erf GELU MLP), no final norm:
  the features are the last block's output (NVlabs/RADIO replaces timm's final norm with Identity).
- Patch embedding: each 16x16 patch flattened channel-major (c, y, x) into a bias-free Linear.
- CPE, the cropped position embedding: the learned (rows x cols) grid is bilinearly resized in fp32
  to a square of max(h, w) patches, cropped to the top-left (h, w), and added to the patch tokens only.
  `align_corners` is a switch: older RADIO code (and the C-RADIOv2-H remote code, reportedly) used
  True, current RADIO, vLLM and transformers use False (our default).
- Prefix tokens (summary CLS tokens + registers) come from one `cls_token.token` tensor whose row
  count is read from the checkpoint; they are prepended, get no position embedding, and are dropped
  from the output.
- The input conditioner ((x - mean) / std with the checkpoint's `norm_mean` / `norm_std`, CLIP
  constants by default) runs inside the model, as in the 8B, for inputs in [0, 1].
- Layer scale (`layer_scale{1,2}.lambda1`) is applied when the checkpoint has it (transformers'
  RadioModel saves it), identity otherwise (the releases have none).
Module names mirror the release keys (`radio_model.model.blocks.N.attn.qkv`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanovl.errors import CheckpointError
from nanovl.models.layers import GeluMLP

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# timm ViT names used in `vision_config.args.model`: (width, depth, heads, mlp)
VIT_DIMS = {
    "vit_small_patch16_224": (384, 12, 6, 1536),
    "vit_base_patch16_224": (768, 12, 12, 3072),
    "vit_large_patch16_224": (1024, 24, 16, 4096),
    "vit_huge_patch16_224": (1280, 32, 16, 5120),
}


@dataclass
class RadioConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: int
    num_prefix_tokens: int  # CLS + registers: rows of cls_token.token
    pos_grid: tuple[int, int]  # learned position grid (rows, cols), from pos_embed's length
    layer_norm_eps: float = 1e-6
    layer_scale: bool = False
    align_corners: bool = False
    conditioner: bool = True  # normalise inputs inside the model (8B); False when the processor does (12B V2)

    @classmethod
    def from_hf(cls, v: dict, shapes: dict, prefix: str) -> RadioConfig:
        """v: the vision_config dict; shapes: checkpoint tensor shapes; prefix: e.g. "vision_model.radio_model."."""
        args = v.get("args") or {}
        if all(k in v for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")):
            width, depth, heads = v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"]
            mlp = v.get("intermediate_size") or int(width * v.get("mlp_ratio", 4.0))
        elif args.get("model") in VIT_DIMS:
            width, depth, heads, mlp = VIT_DIMS[args["model"]]
        else:
            raise CheckpointError(
                f"cannot size the RADIO encoder: vision_config.args.model is {args.get('model')!r} "
                f"(known: {', '.join(VIT_DIMS)}) and there is no hidden_size/num_hidden_layers/num_attention_heads"
            )
        for key, bad in (("model_norm", True), ("qk_normalization", True)):
            if args.get(key) == bad:
                raise CheckpointError(f"RADIO with {key}={bad} is not supported")
        pg = prefix + "model.patch_generator."
        cls_shape, pos_shape = shapes.get(pg + "cls_token.token"), shapes.get(pg + "pos_embed")
        if cls_shape is None or pos_shape is None:
            raise CheckpointError(f"checkpoint lacks {pg}cls_token.token or {pg}pos_embed")
        side = int(round(pos_shape[1] ** 0.5))
        if side * side != pos_shape[1]:
            raise CheckpointError(f"{pg}pos_embed has {pos_shape[1]} positions, not a square grid")
        return cls(
            hidden_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=mlp,
            patch_size=v.get("patch_size", args.get("patch_size", 16)),
            num_prefix_tokens=cls_shape[0],
            pos_grid=(side, side),
            layer_norm_eps=args.get("layer_norm_eps", v.get("layer_norm_eps", 1e-6)),
            layer_scale=(prefix + "model.blocks.0.layer_scale1.lambda1") in shapes,
        )


class ClsToken(nn.Module):
    def __init__(self, n: int, dim: int):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(n, dim))


class PatchGenerator(nn.Module):
    def __init__(self, cfg: RadioConfig):
        super().__init__()
        self.cfg = cfg
        self.embedder = nn.Linear(3 * cfg.patch_size**2, cfg.hidden_size, bias=False)
        rows, cols = cfg.pos_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, rows * cols, cfg.hidden_size))
        self.cls_token = ClsToken(cfg.num_prefix_tokens, cfg.hidden_size)
        self._pos_cache: dict = {}

    def position_embedding(self, h: int, w: int, dtype) -> torch.Tensor:
        key = (h, w, dtype, self.pos_embed._version)  # a weight update invalidates the cache
        if key in self._pos_cache and not torch.is_grad_enabled():
            return self._pos_cache[key]
        rows, cols = self.cfg.pos_grid
        pos = self.pos_embed.reshape(1, rows, cols, -1).permute(0, 3, 1, 2)  # (1, C, rows, cols)
        if (h, w) != (rows, cols):
            side = max(h, w)
            pos = F.interpolate(pos.float(), size=(side, side), mode="bilinear", align_corners=self.cfg.align_corners)
            pos = pos[:, :, :h, :w]  # crop the top-left window
        pos = pos.to(dtype).flatten(2).transpose(1, 2)  # (1, h*w, C)
        if not torch.is_grad_enabled():
            self._pos_cache[key] = pos
        return pos

    def forward(self, x):
        # x: (N, 3, H, W) -> (N, prefix + h*w, C)
        N, _, H, W = x.shape
        p = self.cfg.patch_size
        h, w = H // p, W // p
        patches = x.reshape(N, 3, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(N, h * w, 3 * p * p)
        tokens = self.embedder(patches) + self.position_embedding(h, w, patches.dtype)
        prefix = self.cls_token.token.expand(N, -1, -1)
        return torch.cat([prefix.to(tokens.dtype), tokens], dim=1)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.lambda1


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: RadioConfig):
        super().__init__()
        c = cfg.hidden_size
        self.norm1 = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.attn = Attention(c, cfg.num_attention_heads)
        self.norm2 = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.mlp = GeluMLP(c, cfg.intermediate_size)
        self.layer_scale1 = LayerScale(c) if cfg.layer_scale else nn.Identity()
        self.layer_scale2 = LayerScale(c) if cfg.layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.layer_scale1(self.attn(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class RadioViT(nn.Module):
    def __init__(self, cfg: RadioConfig):
        super().__init__()
        self.patch_generator = PatchGenerator(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))


class InputConditioner(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("norm_mean", torch.tensor(CLIP_MEAN).view(3, 1, 1))
        self.register_buffer("norm_std", torch.tensor(CLIP_STD).view(3, 1, 1))

    def forward(self, x, dtype):
        return ((x.float() - self.norm_mean.float()) / self.norm_std.float()).to(dtype)


class RadioModel(nn.Module):
    """pixels in [0, 1], (N, 3, H, W) with H, W multiples of the patch size -> patch features (N, h*w, C)."""

    # tensors of the release that inference does not use
    UNUSED = (r"(^|\.)summary_idxs$", r"patch_generator\.video_embedder\.", r"\.adaptors\.", r"feature_normalizer\.")

    def __init__(self, cfg: RadioConfig):
        super().__init__()
        self.cfg = cfg
        self.model = RadioViT(cfg)
        if cfg.conditioner:
            self.input_conditioner = InputConditioner()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = self.model.patch_generator.pos_embed.dtype  # a Parameter even when the Linears are packed
        x = self.input_conditioner(pixels, dtype) if self.cfg.conditioner else pixels.to(dtype)
        x = self.model.patch_generator(x)
        for block in self.model.blocks:
            x = block(x)
        return x[:, self.cfg.num_prefix_tokens :]
