"""A store of post-projector image embeddings, so a page asked about twice is encoded once.

- Key: a hash of the image's RGB pixels, its tile plan (grid, thumbnail), the family's preprocessing
  (tile size, grid rule, resize filter, normalisation) and the model (its config.json and weight
  file sizes). Any change to one of these gives another key.
- Memory: an LRU with a byte cap. Disk (optional): one safetensors file per key, written to a
  temporary name, flushed and renamed into place, so a crash mid-write never leaves a torn entry.
  Each file carries a SHA-256 of its dtype, shape and bytes in its metadata; on reading, an entry
  whose digest, shape (the caller's expected one) or values (NaN, infinite) are wrong, or that is
  unreadable, is dropped and recomputed. Entries survive restarts.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


def model_fingerprint(model_dir: str | Path) -> str:
    d = Path(model_dir)
    h = hashlib.sha256((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:32]


def image_key(image, plan, spec, model_id: str) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(np.asarray(image).tobytes())
    h.update(repr((image.size, plan.grid, plan.thumbnail, spec, model_id)).encode())
    return h.hexdigest()


def content_digest(value: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{value.dtype}{tuple(value.shape)}".encode())
    h.update(value.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class EmbedStore:
    def __init__(self, max_bytes: int = 1 << 30, directory: str | Path | None = None):
        self.max_bytes, self.bytes = max_bytes, 0
        self.memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.dir = Path(directory) if directory else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.hits = self.misses = self.dropped = 0

    def get(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        """The entry for `key`, or None; shape: what the caller needs (an entry of another is dropped)."""
        with self.lock:
            value = self.memory.get(key)
            if value is not None and (shape is None or tuple(value.shape) == tuple(shape)):
                self.memory.move_to_end(key)
                self.hits += 1
                return value
        value = self._read(key, shape)
        with self.lock:
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
        self._remember(key, value)
        return value

    def put(self, key: str, value: torch.Tensor):
        value = value.detach().contiguous()
        self._remember(key, value)
        if self.dir is not None:
            self._write(key, value)

    def _remember(self, key: str, value: torch.Tensor):
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self.lock:
            if key in self.memory:
                return
            self.memory[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.memory.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def _read(self, key: str, shape: tuple[int, ...] | None) -> torch.Tensor | None:
        if self.dir is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, "pt") as f:
                digest = (f.metadata() or {}).get("sha256")
                value = f.get_tensor("embeds")
            ok = (
                digest == content_digest(value)
                and (shape is None or tuple(value.shape) == tuple(shape))
                and bool(torch.isfinite(value).all())
            )
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError):
            ok = False
        if not ok:  # unreadable, altered or not what the caller needs: drop it, it will be recomputed
            path.unlink(missing_ok=True)
            self.dropped += 1
            return None
        return value

    def _write(self, key: str, value: torch.Tensor):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({"embeds": value}, tmp, metadata={"sha256": content_digest(value)})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: readers see the old state or the whole new file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
