"""Vision speed: preprocessing and the RADIO encoder, nanovl against transformers in one run.

    python benchmarks/vision.py [--tiles 4] [--vit vit_huge_patch16_224] [--dtype bfloat16]

1. Preprocessing (image -> grid -> resized tiles -> tensor), tiles per second, on the same images:
   - NVLM-D family (448 px, up to 6 tiles + thumbnail, ImageNet normalisation): nanovl against
     transformers' InternVL image processor (GotOcr2ImageProcessorPil, crop_to_patches).
   - Nano-VL-8B family (512 px, up to 12 tiles + thumbnail, normalised inside the model): nanovl
     against the same transformers processor set to 512 px / 12 tiles without normalisation
     (transformers has no processor for this family; it does the same work with the InternVL rule).
   Images: the corpus images and PDF pages (rendered at 144 DPI) when ../shared/corpus is present,
   plus synthetic pages of common sizes.
2. Encoder: C-RADIO (random weights of the chosen timm size) on 512x512 tiles, nanovl's RadioModel
   against transformers' RadioModel loaded from the same saved checkpoint.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def bench_images() -> list[Image.Image]:
    from nanovl.media import load_document

    images = []
    for path in sorted(CORPUS.glob("*/*")):
        if path.suffix.lower() in (".pdf", ".png", ".jpg"):
            images += load_document(path, pages="1")
    rng = np.random.default_rng(0)
    for w, h in [(1224, 1584), (1654, 2339), (800, 600), (3000, 400)]:
        images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return images


def rate(fn, images, repeats=2) -> tuple[float, int]:
    """Best tiles/s over `repeats` passes of fn(image) -> tensor (tiles, 3, S, S)."""
    best, tiles = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tiles = sum(fn(im).shape[0] for im in images)
        best = min(best, time.perf_counter() - t0)
    return tiles / best, tiles


def preprocessing(images):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from nanovl.tiling import IMAGENET_MEAN, IMAGENET_STD, TileSpec, make_tiles, plan_tiles

    families = {
        "NVLM-D (448, 6)": (
            TileSpec("internvl", 448, 1, 6, True, 256, IMAGENET_MEAN, IMAGENET_STD),
            dict(
                size={"height": 448, "width": 448},
                max_patches=6,
                image_mean=list(IMAGENET_MEAN),
                image_std=list(IMAGENET_STD),
            ),
        ),
        "Nano-VL-8B (512, 12)": (
            TileSpec("nano_vl", 512, 1, 12, True, 256),
            dict(size={"height": 512, "width": 512}, max_patches=12, do_normalize=False),
        ),
    }
    print(f"preprocessing, {len(images)} images")
    print(f"{'family':>22} {'engine':>13} {'tiles':>6} {'tiles/s':>8} {'x transformers':>15}")
    for name, (spec, kw) in families.items():
        ref = GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1, **kw)
        r_ref, n_ref = rate(lambda im: ref(im, return_tensors="pt")["pixel_values"], images)  # noqa: B023
        r_ours, n_ours = rate(lambda im: make_tiles(im, spec, plan_tiles(spec, *im.size)), images)  # noqa: B023
        print(f"{name:>22} {'transformers':>13} {n_ref:>6} {r_ref:>8.1f} {'1.00':>15}")
        print(f"{name:>22} {'nanovl':>13} {n_ours:>6} {r_ours:>8.1f} {r_ours / r_ref:>15.2f}")


def encoder(vit: str, n_tiles: int, dtype: str):
    from transformers import RadioConfig, RadioModel

    from nanovl.checkpoint import load_radio
    from nanovl.models.radio import VIT_DIMS

    width, depth, heads, mlp = VIT_DIMS[vit]
    cfg = RadioConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        mlp_ratio=mlp / width,
        patch_size=16,
        max_img_size=2048,
        num_cls_tokens=4,
        num_registers=4,
        summary_idxs=[0, 1, 2],
    )
    torch_dtype = getattr(torch, dtype)
    with tempfile.TemporaryDirectory() as d:
        RadioModel(cfg).to(torch_dtype).save_pretrained(d)
        ref = RadioModel.from_pretrained(d, dtype=torch_dtype).eval()
        ours = load_radio(d, dtype=dtype)
    x = torch.rand(n_tiles, 3, 512, 512).to(torch_dtype)
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"\nencoder: C-RADIO {vit} ({params:.0f} M params), {n_tiles} tiles of 512x512, {dtype}")
    print(f"{'engine':>13} {'s/tile':>7} {'tiles/s':>8} {'x transformers':>15}")
    results = {}
    for name, fn in [("transformers", lambda: ref(x).features), ("nanovl", lambda: ours(x))]:
        with torch.inference_mode():
            fn()  # warm-up
            t0 = time.perf_counter()
            out = fn()
            results[name] = (time.perf_counter() - t0, out.float())
    diff = (results["nanovl"][1] - results["transformers"][1]).abs().max().item()
    for name, (t, _) in results.items():
        ratio = results["transformers"][0] / t
        print(f"{name:>13} {t / n_tiles:>7.2f} {n_tiles / t:>8.2f} {ratio:>15.2f}")
    print(f"max |nanovl - transformers| over the features: {diff:.2e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=4, help="tiles per encoder forward")
    ap.add_argument("--vit", default="vit_huge_patch16_224", help="timm size of the RADIO encoder")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    preprocessing(bench_images())
    encoder(args.vit, args.tiles, args.dtype)


if __name__ == "__main__":
    main()
