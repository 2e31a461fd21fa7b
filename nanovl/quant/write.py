"""Writing a quantized checkpoint folder: the steps every `nanovl quantize` writer shares.

- The source is an unquantized checkpoint, loaded in float32 (a quantized one is refused); of a
  vision-language checkpoint the language model's Linear layers are the targets, lm_head stays, and
  the vision tower (but its patch embedding, the first layer) and the projector are added on request.
- The new folder holds every file of the source but its weights, one `model.safetensors` with the
  quantized tensors and everything else as the source stores it (a tied lm_head stays absent), and the
  format's config file(s). `--int8-embeddings` adds the extension's tensors whatever the format.
- The folder is then loaded back the way inference loads it and compared with the source
  (calibrate.py's report), so the report describes the files written, not the tensors in memory.
- FP8 and INT8 quantize layer by layer and share `quantize_layers`; AWQ (which rescales the model
  before rounding it) uses the steps one by one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from nanovl.errors import NanovlError
from nanovl.quant.calibrate import EVAL_OFFSET, calibration_pixels, calibration_texts, report, vision_report
from nanovl.quant.int8_embeddings import int8_embedding_state

if TYPE_CHECKING:
    from nanovl.config import CheckpointConfig
    from nanovl.tokenizer import Tokenizer


@dataclass
class Source:
    """An unquantized checkpoint loaded for a writer, in float32."""

    path: Path
    ckpt: CheckpointConfig
    root: nn.Module  # the whole model: the VLM, or the language model itself
    lm: nn.Module  # the language model
    is_vlm: bool
    tokenizer: Tokenizer

    @property
    def prefix(self) -> str:
        """Where the language model's tensors sit in the checkpoint."""
        return "language_model." if self.is_vlm else ""

    def tokens(self, texts: list[str]) -> list[torch.Tensor]:
        """One (1, length) batch of token ids per text."""
        return [torch.tensor([self.tokenizer.encode(t)]) for t in texts]

    def exclude_patterns(self, include_vision: bool, int8_embeddings: bool) -> list[str]:
        """The layers a ModelOpt / compressed-tensors config lists as left unquantized."""
        exclude = [] if int8_embeddings else [self.prefix + "lm_head"]
        return exclude + ([] if include_vision or not self.is_vlm else ["vision_model*", "mlp1*"])


def check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise NanovlError(f"{out} exists and is not empty")


def load_source(src: Path) -> Source:
    from nanovl.api import load_text_model, load_vlm
    from nanovl.config import load_config
    from nanovl.models.vlm import VLMS
    from nanovl.tokenizer import Tokenizer

    ckpt = load_config(src)
    if (src / "hf_quant_config.json").is_file() or "quantization_config" in ckpt.raw:
        raise NanovlError(f"{src} is already quantized")
    if ckpt.architecture in VLMS:
        root, _ = load_vlm(src, dtype="float32")
        lm, is_vlm = root.language_model, True
    elif ckpt.text_prefix:
        raise NanovlError(f"{src}: a language model stored under {ckpt.text_prefix!r} of an unknown VLM")
    else:
        root, _ = load_text_model(src, dtype="float32")
        lm, is_vlm = root, False
    return Source(src, ckpt, root, lm, is_vlm, Tokenizer(src, ckpt.text.eos_token_ids))


def quant_targets(root: nn.Module, is_vlm: bool, include_vision: bool) -> dict[str, nn.Linear]:
    """The Linear layers to quantize: the language model's but lm_head; with include_vision also the
    vision tower's (but its patch embedding, the first layer) and the projector's."""
    out = {}
    for name, m in root.named_modules():
        if not isinstance(m, nn.Linear) or name.endswith("lm_head"):
            continue
        vision = name.startswith(("vision_model.", "mlp1."))
        if (not is_vlm or name.startswith("language_model.")) or (include_vision and vision):
            if not name.endswith("patch_generator.embedder"):
                out[name] = m
    return out


def unchanged_tensors(src: Source, skip: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors but those in skip, as the source stores them (floats in dtype); a tensor the
    source does not store (a tied lm_head) stays absent."""
    from nanovl.weights import checkpoint_index

    stored = set(checkpoint_index(src.path))
    return {name: t.detach().to(dtype if t.is_floating_point() else t.dtype).contiguous()
            for name, t in src.root.state_dict().items() if name in stored and name not in skip}  # fmt: skip


def write_checkpoint(src: Source, out: Path, state: dict[str, torch.Tensor], configs: dict[str, dict]) -> None:
    """The source's files but its weights, `model.safetensors` from state, and configs ({file name: JSON},
    config.json among them when the format rewrites it)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in src.path.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    for name, content in configs.items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})


def finish(original: Source, out: Path, result: dict, held: list[str]) -> dict:
    """Load the written checkpoint back, add the report against the original to result, write
    quant_report.json and return it."""
    from nanovl.api import load_text_model, load_vlm

    quantized = load_vlm(out, dtype="float32")[0] if original.is_vlm else load_text_model(out, dtype="float32")[0]
    qlm = quantized.language_model if original.is_vlm else quantized
    result = {**result, **report(original.lm, qlm, original.tokens(held))}
    if original.is_vlm:
        pixels = calibration_pixels(original.root, 2, offset=EVAL_OFFSET)
        result.update(vision_report(original.root, quantized, pixels))
    (out / "quant_report.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def quantize_layers(method: str, layer_state: Callable[..., dict], config_files: Callable[..., dict],
                    model_dir: str, out_dir: str, calibration: str | None, samples: int, include_vision: bool,
                    int8_embeddings: bool) -> dict:  # fmt: skip
    """A writer that quantizes each target layer on its own (FP8, INT8). The format supplies
    layer_state(source, targets, calibration texts, samples, include_vision) -> the targets' tensors,
    and config_files(source, include_vision, int8_embeddings) -> {file name: JSON}."""
    src, out = Path(model_dir), Path(out_dir)
    check_out(out)
    source = load_source(src)
    if include_vision and not source.is_vlm:
        raise NanovlError("--include-vision needs a vision-language checkpoint")
    calib, held = calibration_texts(calibration, samples)
    targets = quant_targets(source.root, source.is_vlm, include_vision)
    state = layer_state(source, targets, calib, samples, include_vision)
    if int8_embeddings:
        state.update(int8_embedding_state(source.root, source.is_vlm))
    dtype = getattr(torch, source.ckpt.text.dtype, torch.float32)
    state.update(unchanged_tensors(source, {f"{n}.weight" for n in targets} | set(state), dtype))
    write_checkpoint(source, out, state, config_files(source, include_vision, int8_embeddings))
    result = {"method": method, "calibration_samples": len(calib), "quantized_layers": len(targets),
              "include_vision": include_vision, "int8_embeddings": int8_embeddings}  # fmt: skip
    return finish(source, out, result, held)
