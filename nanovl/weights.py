"""Safetensors checkpoints: find the tensors, load them strictly, save them in the HF layout.

- Single file (`model.safetensors`) or sharded (`model.safetensors.index.json` + shards). Pickle
  checkpoints (`*.bin`, `*.pt`) are refused, never opened.
- Strict: every tensor the model expects must be present with the right shape, and every tensor under
  the model's prefix must be used; the error names the key and the file. Tensors outside the prefix
  belong to other parts of a VLM checkpoint and are left to them.
- No second copy: the model is built on the `meta` device and each tensor read from the file is
  assigned in place of the meta parameter (`load_state_dict(assign=True)`).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from nanovl.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# Tensors some checkpoints carry that no model needs: rotary tables saved by old transformers versions.
IGNORED_KEYS = re.compile(r"rotary_emb\.inv_freq$")


def checkpoint_index(model_dir: str | Path) -> dict[str, Path]:
    """Map every tensor name in the checkpoint to the file holding it."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = {name: model_dir / name for name in set(weight_map.values())}
        for name, path in files.items():
            if not path.is_file():
                raise CheckpointError(f"{index} lists shard {name}, which is missing from {model_dir}")
        return {key: files[name] for key, name in weight_map.items()}
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return {key: single for key in _open(single).keys()}
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{model_dir} holds only pickle weights ({', '.join(pickles[:3])}); nanovl loads safetensors "
            "only, since pickles can run code: convert the checkpoint to safetensors first"
        )
    raise CheckpointError(f"{model_dir} has no {SINGLE_NAME} or {INDEX_NAME}")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def tensor_shapes(index: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor, read from the safetensors headers (no tensor data is read)."""
    shapes = {}
    for path in set(index.values()):
        f = _open(path)
        for key in f.keys():
            shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def load_weights(
    model: nn.Module,
    model_dir: str | Path,
    prefix: str = "",
    dtype: torch.dtype | None = None,
    optional: dict[str, torch.Tensor | None] | None = None,
    unused: tuple[str, ...] = (),
    index: dict[str, Path] | None = None,
) -> None:
    """Fill `model` (built on meta) from the checkpoint's tensors named `prefix + name`.

    optional: model names the checkpoint may omit -> the value to use then (None: filled by
    `model.tie_weights()`, e.g. a tied lm_head). unused: regexes (searched) of checkpoint keys that are
    known and deliberately not loaded. Parameters are cast to `dtype`; buffers keep the checkpoint's dtype.
    """
    index = checkpoint_index(model_dir) if index is None else index
    optional = optional or {}
    skip = re.compile("|".join((IGNORED_KEYS.pattern, *unused)))
    expected = model.state_dict()
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    for key, path in index.items():
        if not key.startswith(prefix) or skip.search(key):
            continue
        name = key[len(prefix) :]
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {key} in {path.name}: the model has no such weight")
        by_file[path].append((key, name))
    found = {name for pairs in by_file.values() for _, name in pairs}
    missing = [n for n in expected if n not in found and n not in optional]
    if missing:
        where = f"{model_dir}/{INDEX_NAME if (Path(model_dir) / INDEX_NAME).is_file() else SINGLE_NAME}"
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {prefix}{missing[0]}{more} in {where}")

    state = {}
    for path, pairs in by_file.items():
        f = _open(path)
        for key, name in pairs:
            want = tuple(expected[name].shape)
            try:
                got = tuple(f.get_slice(key).get_shape())
                if got != want:
                    raise CheckpointError(
                        f"tensor {key} in {path.name} has shape {list(got)}, the model expects {list(want)}"
                    )
                t = f.get_tensor(key)
            except SafetensorError as e:
                raise CheckpointError(f"{path} is corrupt: cannot read {key} ({e})") from None
            if dtype is not None and name in params and t.is_floating_point():
                t = t.to(dtype)
            state[name] = t
    for name, default in optional.items():
        if name not in found and default is not None:
            state[name] = default
    result = model.load_state_dict(state, strict=False, assign=True)
    assert not result.unexpected_keys, result.unexpected_keys  # checked above
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def save_weights(state: dict[str, torch.Tensor], out_dir: str | Path, max_shard_bytes: int | None = None) -> list[Path]:
    """Write `state` as model.safetensors, or as shards plus an index when it exceeds max_shard_bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out_dir / SINGLE_NAME, metadata={"format": "pt"})
        return [out_dir / SINGLE_NAME]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / name, metadata={"format": "pt"})
        paths.append(out_dir / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return paths
