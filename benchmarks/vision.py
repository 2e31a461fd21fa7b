"""Vision speed: preprocessing and the RADIO encoder, nanovl against transformers in one run.

    python benchmarks/vision.py [--tiles 4] [--vit vit_huge_patch16_224] [--skip-preprocessing] [--slow-rows]

1. Preprocessing (image -> grid -> resized tiles -> tensor), tiles per second, on the same images:
   - NVLM-D family (448 px, up to 6 tiles + thumbnail, ImageNet normalisation): nanovl against
     transformers' InternVL image processor (GotOcr2ImageProcessorPil, crop_to_patches).
   - Nano-VL-8B family (512 px, up to 12 tiles + thumbnail, normalised inside the model): nanovl
     against the same transformers processor set to 512 px / 12 tiles without normalisation
     (transformers has no processor for this family; it does the same work with the InternVL rule).
   Images: the corpus images and PDF pages (rendered at 144 DPI) when ../shared/corpus is present,
   plus synthetic pages of common sizes.
2. Encoder: C-RADIO (random weights of the chosen timm size) on 512x512 tiles, nanovl's RadioModel
   against transformers' RadioModel loaded from the same saved checkpoint, and onnxruntime (fp32, and
   onnxruntime's dynamic int8) on nanovl's graph exported to ONNX. Each row gives its achieved GFLOP/s
   (the forward's FLOPs counted by torch's FlopCounterMode) as a fraction of the host's measured peak:
   a large matmul in the same dtype, timed in the same run. The CPU flags that decide which kernels
   exist (AMX, avx512_bf16) are printed first.
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


def cpu_flags() -> list[str]:
    """The /proc/cpuinfo flags that decide the fast paths (nanovl/cpu.py reads them)."""
    from nanovl.cpu import cpu_info

    return cpu_info()["flags"]


def matmul_peak(dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float:
    """GFLOP/s of the best of `repeats` n x n x n matmuls: the host's practical peak in this dtype.
    Where a 512^3 probe is slow (bf16 without a bf16 kernel: about 1 GFLOP/s in torch.mm on an AVX2-only
    host, where 4096^3 would take minutes) the size comes down so one product takes about a second."""
    probe = torch.randn(512, 512).to(dtype)
    t0 = time.perf_counter()
    torch.mm(probe, probe)
    n = min(n, max(512, int((1.0 / max(time.perf_counter() - t0, 1e-9)) ** (1 / 3) * 512) // 256 * 256))
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up (oneDNN picks its kernel)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def count_cpu_attention() -> None:
    """FlopCounterMode counts nothing for the CPU flash-attention kernel (torch 2.13: no formula for
    aten._scaled_dot_product_flash_attention_for_cpu). Count it as torch counts the CUDA one
    (4*B*H*T*S*D), halved when causal: the kernel skips the fully masked blocks."""
    from torch.utils import flop_counter

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
        n = flop_counter.sdpa_flop_count(query, key, value)
        return n // 2 if is_causal else n


def forward_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    count_cpu_attention()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        fn()
    return counter.get_total_flops()


def timed(fn, warm=None) -> tuple[float, torch.Tensor]:
    """Seconds of one fn() after a warm-up call (warm(), a smaller input, where given)."""
    with torch.inference_mode():
        (warm or fn)()
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def onnx_rows(model, x: torch.Tensor, workdir: str) -> dict:
    """nanovl's encoder exported to ONNX, run by onnxruntime in fp32 and dynamic int8 -> {name: (s, out)}."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        print("onnxruntime rows skipped: onnxruntime is not installed")
        return {}
    import warnings

    path = str(Path(workdir) / "radio.onnx")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.float(), (x.float()[:1],), path, input_names=["pixels"], output_names=["features"],
                              dynamic_axes={"pixels": {0: "tiles"}}, opset_version=18, dynamo=False)  # fmt: skip
        import logging

        logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's advice to pre-process, on every call
        quantize_dynamic(path, path + ".int8", weight_type=QuantType.QInt8)
    except Exception as e:  # noqa: BLE001 - a benchmark row, not a product path: say why it is missing
        print(f"onnxruntime rows skipped: export failed ({type(e).__name__}: {str(e)[:120]})")
        return {}
    rows, feed = {}, {"pixels": x.float().numpy()}
    for name, file in (("onnxruntime fp32", path), ("onnxruntime int8", path + ".int8")):
        session = ort.InferenceSession(file, providers=["CPUExecutionProvider"])
        session.run(None, feed)  # warm-up
        t0 = time.perf_counter()
        out = session.run(None, feed)[0]
        rows[name] = (time.perf_counter() - t0, torch.from_numpy(out))
    return rows


def encoder(vit: str, n_tiles: int, slow_rows: bool):
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
    from nanovl.cpu import compute_dtype

    pick = "bfloat16" if compute_dtype() == torch.bfloat16 else "float32"  # what nanovl's load picks here
    with tempfile.TemporaryDirectory() as d:
        RadioModel(cfg).to(torch.bfloat16).save_pretrained(d)  # the releases' dtype
        refs = {dt: RadioModel.from_pretrained(d, dtype=getattr(torch, dt)).eval() for dt in ("bfloat16", "float32")}
        ours = {dt: load_radio(d, dtype=dt) for dt in ("bfloat16", "float32")}
    x = torch.rand(n_tiles, 3, 512, 512)
    params = sum(p.numel() for p in ours[pick].parameters()) / 1e6
    flops = forward_flops(lambda: ours["float32"](x[:1])) * n_tiles
    peaks = {"bfloat16": matmul_peak(torch.bfloat16), "float32": matmul_peak(torch.float32)}
    print(f"\nencoder: C-RADIO {vit} ({params:.0f} M params), {n_tiles} tiles of 512x512, {flops / 1e9:.0f} GFLOP")
    print(f"matmul peak here: bf16 {peaks['bfloat16']:.0f}, fp32 {peaks['float32']:.0f} GFLOP/s; "
          f"nanovl's measured pick (nanovl/cpu.py): {pick}")  # fmt: skip
    slow = [dt for dt in peaks if peaks[dt] < max(peaks.values()) / 4 and not slow_rows]
    if slow:
        print(f"(rows in {', '.join(slow)} skipped: under a quarter of the other dtype's peak here; --slow-rows)")
    results = {}
    for dt in ("bfloat16", "float32"):
        if dt not in slow:
            xd = x.to(getattr(torch, dt))
            results[f"transformers {dt}"] = (dt, *timed(lambda: refs[dt](xd).features, lambda: refs[dt](xd[:1])))  # noqa: B023
    from nanovl.checkpoint import pack_vision
    from nanovl.quant.prepack import keep_freed_memory

    heap = keep_freed_memory()  # what nanovl's load sets (load_radio/load_vlm with pack): after transformers' rows
    for dt in (pick, *[d for d in peaks if d != pick]):
        if dt not in slow:
            pack_vision(ours[dt])  # bf16 on a CPU with oneDNN bf16 kernels: prepacked, bias and GELU fused
            xd = x.to(getattr(torch, dt))
            results[f"nanovl {dt}"] = (dt, *timed(lambda: ours[dt](xd), lambda: ours[dt](xd[:1])))  # noqa: B023
    if heap:  # the same setting under transformers: how much of nanovl's lead it accounts for
        xd = x.to(getattr(torch, pick))
        results["transformers +heap"] = (pick, *timed(lambda: refs[pick](xd).features, lambda: refs[pick](xd[:1])))
    with tempfile.TemporaryDirectory() as d:
        for name, (t, out) in onnx_rows(ours["float32"], x, d).items():
            results[name] = ("float32", t, out)
    base_name = "transformers bfloat16" if "transformers bfloat16" in results else "transformers float32"
    base, reference = results[base_name][1], results[base_name][2].float()
    head = ("engine", "dtype", "s/tile", "tiles/s", "GFLOP/s", "of peak", f"x {base_name}", "max diff")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (21, 9, 7, 8, 8, 8, 15, 9))))
    for name, (dt, t, out) in results.items():
        rate_ = flops / t / 1e9
        diff = (out.float() - reference).abs().max().item()
        share = "-" if "int8" in name else f"{rate_ / peaks[dt]:.0%}"  # no int8 matmul peak is measured
        print(f"{name:>21} {dt:>9} {t / n_tiles:>7.2f} {n_tiles / t:>8.2f} {rate_:>8.0f} {share:>8} "
              f"{base / t:>15.2f} {diff:>9.2e}")  # fmt: skip
    print(
        "(GFLOP/s: the fp32 forward's FLOPs over the time, for int8 too; max diff: against transformers' "
        "features in its dtype; a peak is torch's own matmul, which another library's kernels may beat; "
        "+heap: transformers run after nanovl's glibc setting, freed memory reused: quant/prepack.py)"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=4, help="tiles per encoder forward")
    ap.add_argument("--vit", default="vit_huge_patch16_224", help="timm size of the RADIO encoder")
    ap.add_argument("--slow-rows", action="store_true", help="also run a dtype whose matmul peak here is under a "
                    "quarter of the other's (bf16 on an AVX2-only host: minutes per tile)")  # fmt: skip
    ap.add_argument("--skip-preprocessing", action="store_true")
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU flags: {' '.join(cpu_flags()) or 'none'}\n"
    )
    if not args.skip_preprocessing:
        preprocessing(bench_images())
    encoder(args.vit, args.tiles, args.slow_rows)


if __name__ == "__main__":
    main()
