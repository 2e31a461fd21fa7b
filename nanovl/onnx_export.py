"""The vision path as ONNX (`nanovl export onnx`, `--vision-backend onnx`).

One graph: tiles (N, 3, S, S), normalised as the processor normalises them -> the vision encoder ->
pixel shuffle -> the projector -> embeddings (N, tokens, hidden), N dynamic. Exported with torch's
TorchScript-based exporter (opset 18, which the current onnxruntime runs), in float32. Beside it,
vision.json holds what a runtime needs and what ties the graph to its checkpoint: the tiling and
normalisation, the token count and width, and the checkpoint's fingerprint (config and weight file
sizes), checked when the graph is loaded. `--int8` also writes onnxruntime's dynamic int8
quantization of the graph (weights int8, activations quantized per batch), with its embedding
error against float32 measured on random tiles and recorded.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from nanovl.errors import CheckpointError, NanovlError

OPSET = 18
GRAPH, INT8_GRAPH, META = "vision.onnx", "vision.int8.onnx", "vision.json"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise NanovlError("the ONNX vision backend needs onnxruntime: pip install onnxruntime onnx "
                          "(or nanovl's 'onnx' extra)") from None  # fmt: skip
    return onnxruntime


class _VisionPath(torch.nn.Module):
    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm

    def forward(self, pixels):
        return self.vlm.encode_images(pixels)


def export(model_dir: str | Path, out: str | Path, int8: bool = False) -> dict:
    """Write OUT/vision.onnx (and vision.int8.onnx) and OUT/vision.json; returns the metadata."""
    import warnings

    from nanovl.checkpoint import load_config, load_vlm
    from nanovl.engine.embed_store import model_fingerprint
    from nanovl.models import is_vlm

    try:
        import onnx  # noqa: F401 - torch's exporter needs it
    except ImportError:
        raise NanovlError("exporting ONNX needs the onnx package: pip install onnx onnxruntime") from None
    if not is_vlm(load_config(model_dir).architecture):
        raise CheckpointError(f"{model_dir} is a text-only checkpoint: it has no vision path to export")
    vlm, _ = load_vlm(model_dir, "float32")
    vlm, spec = vlm.eval(), vlm.config.tiles
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, 3, spec.tile_size, spec.tile_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes it records as constants (the tile size)
        torch.onnx.export(_VisionPath(vlm), (example,), str(out / GRAPH), input_names=["pixels"],
                          output_names=["embeds"], dynamic_axes={"pixels": {0: "tiles"}, "embeds": {0: "tiles"}},
                          opset_version=OPSET, dynamo=False)  # fmt: skip
    meta = {
        "format": "nanovl-vision-onnx/1",
        "model": model_fingerprint(Path(model_dir)),
        "architecture": type(vlm).__name__,
        "tiles": asdict(spec),
        "hidden": vlm.config.text.hidden_size,
        "opset": OPSET,
        "input": "pixels (tiles, 3, tile_size, tile_size) float32, normalised with tiles.mean / tiles.std when given",
        "output": "embeds (tiles, tokens_per_tile, hidden) float32",
    }
    if int8:
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR  # its advice to pre-process, on every call
        try:
            quantize_dynamic(str(out / GRAPH), str(out / INT8_GRAPH), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        meta["int8"] = int8_error(out, spec)
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def int8_error(out: Path, spec, tiles: int = 4) -> dict:
    """The int8 graph's embedding error against the float32 graph's on random tiles."""
    ort = _onnxruntime()
    x = torch.randn(tiles, 3, spec.tile_size, spec.tile_size, generator=torch.Generator().manual_seed(0)).numpy()
    ref = ort.InferenceSession(str(out / GRAPH), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
    got = ort.InferenceSession(str(out / INT8_GRAPH), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
    err = abs(got - ref)
    return {"max_abs": float(err.max()), "mean_abs": float(err.mean()),
            "relative_rms": float(((got - ref) ** 2).mean() ** 0.5 / ((ref**2).mean() ** 0.5 + 1e-12))}  # fmt: skip


class OnnxVision:
    """The exported vision path under onnxruntime, checked against the checkpoint it is used with."""

    def __init__(self, folder: str | Path, model_dir: str | Path, spec, hidden: int, int8: bool = False):
        from nanovl.engine.embed_store import model_fingerprint

        ort = _onnxruntime()
        folder = Path(folder)
        graph = folder / (INT8_GRAPH if int8 else GRAPH)
        if not (folder / META).is_file() or not graph.is_file():
            raise CheckpointError(f"{folder}: no exported vision graph ({graph.name} and {META}); write them "
                                  f"with `nanovl export onnx --model {model_dir} --out {folder}`")  # fmt: skip
        try:
            meta = json.loads((folder / META).read_text())
        except ValueError as e:
            raise CheckpointError(f"{folder / META}: not JSON ({e})") from None
        want = {"model": model_fingerprint(Path(model_dir)), "tiles": asdict(spec), "hidden": hidden}
        for key, value in want.items():
            if json.loads(json.dumps(meta.get(key))) != json.loads(json.dumps(value)):
                raise CheckpointError(f"{graph}: exported from another checkpoint or configuration ({key} "
                                      f"differs from {model_dir}'s); export it again")  # fmt: skip
        options = ort.SessionOptions()
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.path = graph

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, S, S) -> (tiles, tokens, hidden) float32."""
        out = self.session.run(None, {"pixels": pixels.float().contiguous().numpy()})[0]
        return torch.from_numpy(out)
