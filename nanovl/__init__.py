"""nanovl: the Nemotron Nano VL family, natively in PyTorch."""

from __future__ import annotations

from pathlib import Path

from nanovl.api import TextModel, VisionLanguageModel
from nanovl.api import load as load_folder
from nanovl.errors import NanovlError
from nanovl.hub import resolve_model

__version__ = "0.1.0"
__all__ = ["NanovlError", "TextModel", "__version__", "load"]


def load(model: str | Path, dtype: str | None = None, **options) -> TextModel | VisionLanguageModel:
    """A checkpoint folder or a Hugging Face hub id (e.g. nvidia/Llama-3.1-Nemotron-Nano-VL-8B-V1,
    read through the hub cache) -> a VisionLanguageModel for VLM architectures, else a TextModel.
    dtype and options: as nanovl.api.load."""
    return load_folder(resolve_model(model), dtype, **options)
