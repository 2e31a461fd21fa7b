"""Loading a checkpoint folder: config -> model built on `meta` -> quantized modules swapped in from
the checkpoint's own quantization config -> weights loaded strictly from its safetensors.

- `load_text_model` builds a language model (or a VLM's language model alone), `load_vlm` a whole
  vision-language checkpoint, `load_radio` a RADIO encoder alone.
- The dtype is the checkpoint's unless asked otherwise; float16 becomes bfloat16 (slow on CPUs).
- `pack=True` is for inference on CPU: bf16 Linear layers prepacked for oneDNN, AWQ layers onto
  PyTorch's int4 kernel (`fast_cpu_modules`); the model is then for inference only. With the dtype
  left to auto, a bf16 checkpoint on a CPU whose fp32 matmuls are faster (measured once: cpu.py) gets
  its encoder and projector in fp32 and its LLM's prefill chunks computed in fp32.
- `load_config` reads config.json; the registry (nanovl/models/__init__.py) says what it builds.
- `tile_spec`, `preprocessor_config` and `generation_defaults` read the other files of the folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanovl.config import CheckpointConfig, read_json
from nanovl.cpu import compute_dtype, upcast_linears
from nanovl.errors import CheckpointError, RequestError
from nanovl.models import architecture, text_architecture, text_config_class, text_model_class
from nanovl.quant.prepack import keep_freed_memory, pack_linears, packing_supported, trim_heap
from nanovl.weights import checkpoint_index, load_weights, tensor_shapes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def text_config(d: dict, architecture: str):
    """A text architecture's config from its (possibly nested) config.json dict."""
    return text_config_class(architecture).from_hf(d, architecture)


def load_config(model_dir: str | Path) -> CheckpointConfig:
    """config.json -> the top-level architecture and its text config (nested or not)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist")
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json: is it a Hugging Face checkpoint folder?")
    raw = read_json(path)
    archs = raw.get("architectures") or []
    if not archs:
        raise CheckpointError(f"{path} names no `architectures`")
    nested_key = next((k for k in ("llm_config", "text_config") if isinstance(raw.get(k), dict)), None)
    if nested_key is None:
        return CheckpointConfig(archs[0], text_config(raw, archs[0]), "", raw)
    text = raw[nested_key]
    text_arch = (text.get("architectures") or [None])[0] or text_architecture(text.get("model_type"))
    if text_arch is None:
        raise CheckpointError(f"{path}: `{nested_key}` names no architectures and no known model_type")
    return CheckpointConfig(archs[0], text_config(text, text_arch), "language_model.", raw)


def vlm_class(ckpt: CheckpointConfig):
    """The VisionLanguageModule class of a checkpoint; an error for a text-only one."""
    row = architecture(ckpt.architecture)
    if not row.vlm:
        raise CheckpointError(f"{ckpt.architecture} is not a vision-language architecture")
    return row.model


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
        fast_cpu_modules(model, torch_dtype, auto=dtype in (None, "auto"))
    return model, ckpt


def load_vlm(model_dir: str | Path, dtype: str | None = None, pack: bool = False, align_corners: bool | None = None):
    """Build a whole vision-language checkpoint (encoder, projector, LLM) and load it strictly.

    align_corners: RADIO's position-grid interpolation switch (models/radio.py); None keeps the default.
    """
    ckpt = load_config(model_dir)
    cls = vlm_class(ckpt)
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
        auto = dtype in (None, "auto")
        if auto and upcast_wanted(torch_dtype, vlm.language_model.device):
            vision_to_float32(vlm)
        else:
            for part in (vlm.vision_model, vlm.mlp1):
                pack_vision(part)
        fast_cpu_modules(vlm.language_model, torch_dtype, auto)
    return vlm, ckpt


def fast_cpu_modules(model, dtype: torch.dtype, auto: bool = False) -> None:
    """Inference-only swaps for CPU speed: AWQ int4 layers onto PyTorch's int4 kernel; bf16 Linear
    layers prepacked for oneDNN (quant/prepack.py), or, with the dtype left to `auto` on a host whose
    fp32 matmuls are faster, computing prefill chunks in fp32 (cpu.py)."""
    from nanovl.quant.prepack import repack_int4

    if model.device.type != "cpu":
        return
    repack_int4(model, dtype)
    if auto and upcast_wanted(dtype, model.device):
        upcast_linears(model)
    elif packing_supported(dtype, model.device):
        pack_linears(model)
    trim_heap()
    keep_freed_memory()  # after the load's temporaries are handed back: the forwards reuse their memory


def pack_vision(model) -> None:
    """An encoder or projector with bf16 Linear layers on a CPU with oneDNN bf16 kernels: prepacked,
    its biases and its MLPs' GELU computed inside the matmul (quant/prepack.py)."""
    p = next(model.parameters(), None)
    if p is not None and packing_supported(p.dtype, p.device):
        pack_linears(model)


def upcast_wanted(dtype: torch.dtype, device: torch.device) -> bool:
    """A bf16 model on a CPU that computes faster in fp32 (measured once per host: cpu.py)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and compute_dtype() == torch.float32


def vision_to_float32(vlm) -> None:
    """The encoder and projector in fp32 (their outputs are cast to the LLM's dtype where merged), unless
    a quantized layer makes the vision side more than plain bf16 floats."""
    parts = (vlm.vision_model, vlm.mlp1)
    if all(p.dtype == torch.bfloat16 for part in parts for p in part.parameters()):
        for part in parts:
            part.float()


def load_radio(
    model_dir: str | Path, prefix: str = "radio_model.", dtype: str = "float32", pack: bool = False, **overrides
):
    """A RADIO encoder alone (a C-RADIO checkpoint folder, or transformers' RadioModel saved with
    save_pretrained, whose tensors carry the release names). pack: for CPU inference, as load_vlm's
    encoder (pack_vision). overrides: RadioConfig fields."""
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
    model.eval().requires_grad_(False)
    if pack:
        pack_vision(model)
        trim_heap()
        keep_freed_memory()
    return model


def tile_spec(model_dir: str | Path):
    """How a vision-language checkpoint tiles images, from its config files alone (no weights)."""
    ckpt = load_config(model_dir)
    cls = vlm_class(ckpt)
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
