"""The source of a quantization writer: an unquantized checkpoint loaded in float32 (write.py loads
it; the formats' layer writers read it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

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
