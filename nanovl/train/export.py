"""Trained weights out: a checkpoint folder in the starting model's HF layout; LoRA adapters folded in.

- What is written is the release's own layout: the weights under the release names, in the
  checkpoint's dtype (tied lm_head left out), beside copies of the source folder's config and
  tokenizer files (CHECKPOINT_FILES), so the folder loads like the model it started from.
- Written aside (DEST.tmp) and renamed into place: an interrupted export leaves no half folder.
- `merge_checkpoint` (`nanovl train merge-lora`): base + PEFT-layout adapter -> a plain folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from nanovl.errors import DataError

CHECKPOINT_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")  # fmt: skip


def export_model(root: nn.Module, ckpt, src_dir: str | Path, dest: Path, vlm: bool) -> Path:
    """Write root's weights under the release names, in the checkpoint's dtype, beside copies of the
    source folder's config and tokenizer files; written aside and renamed into place."""
    from nanovl.weights import save_weights

    dtype = getattr(torch, ckpt.text.dtype, torch.float32)
    prefix = "" if vlm else ckpt.text_prefix
    state = {prefix + n: t.to(dtype) for n, t in root.state_dict().items()}
    if ckpt.text.tie_word_embeddings:
        state = {n: t for n, t in state.items() if not n.endswith("lm_head.weight")}
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(state, tmp, max_shard_bytes=5 * 2**30)
    for name in CHECKPOINT_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy(Path(src_dir) / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def merge_checkpoint(adapter: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """base checkpoint + LoRA adapter -> a plain checkpoint folder with the adapter folded in."""
    from nanovl.checkpoint import load_config, load_text_model, load_vlm
    from nanovl.models import is_vlm
    from nanovl.train.lora import load_adapter, merge_lora

    cfg_path = Path(adapter) / "adapter_config.json"
    if not cfg_path.is_file():
        raise DataError(f"{adapter}: no adapter_config.json (expected OUT/adapter of a LoRA run)")
    base = base or json.loads(cfg_path.read_text())["base_model_name_or_path"]
    ckpt = load_config(base)
    vlm = is_vlm(ckpt.architecture)
    root, _ = load_vlm(base, dtype="float32") if vlm else load_text_model(base, dtype="float32")
    load_adapter(root, adapter)
    merge_lora(root)
    return export_model(root, ckpt, base, Path(out), vlm=vlm)
