"""nanovl's int8 embedding extension (`--int8-embeddings`), with any of the formats; other engines do not read it.

- Declared by `"nanovl_int8_embeddings": true` in the format's quantization config; the tensors say
  which modules are stored so.
- Layout: the token embedding `weight` int8 [vocab, hidden] + `weight_scale` fp32 [vocab, 1], and an
  untied lm_head the same way (then an Int8Linear, the INT8 layout); a tied lm_head stores nothing and
  multiplies by the embedding's matrix, which so exists once, at a quarter of its fp32 size.
- A lookup dequantizes only the rows it reads, to the model's activation dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from nanovl.errors import CheckpointError, NanovlError
from nanovl.quant.int8 import Int8Linear, int8_linear, int8_rows


class Int8Embedding(nn.Module):
    """int8 token embedding rows [vocab, hidden] with one fp32 scale per row."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype  # of the rows it returns: the model's activation dtype
        self.register_buffer("weight", torch.empty(vocab, hidden, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(vocab, 1, dtype=torch.float32))

    def forward(self, ids):
        return (self.weight[ids].float() * self.weight_scale[ids]).to(self.dtype)


class Int8TiedHead(nn.Module):
    """lm_head tied to an Int8Embedding: no tensors of its own (the embedding is held outside the
    module tree, so the state dict names it once)."""

    def __init__(self, embedding: Int8Embedding):
        super().__init__()
        self._embedding = [embedding]

    def forward(self, x):
        e = self._embedding[0]
        return int8_linear(x, e.weight, e.weight_scale)


def swap_quantized_embeddings(model: nn.Module, keys: set[str], prefix: str, dtype: torch.dtype) -> int:
    """Swap the token embedding and lm_head for their int8 forms, in place, where the checkpoint's
    tensors (keys) carry weight_scale. Returns the count of modules swapped."""
    lm = getattr(model, "language_model", model)  # a VLM's language model sits under language_model
    prefix += "language_model." if lm is not model else ""
    n, embedding = 0, None
    for parent_name, parent in list(lm.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is nn.Embedding and f"{prefix}{full}.weight_scale" in keys:
                embedding = Int8Embedding(child.num_embeddings, child.embedding_dim, dtype)
                setattr(parent, name, embedding)
                n += 1
    if embedding is None:
        raise CheckpointError("the config says nanovl_int8_embeddings, but no embedding carries weight_scale")
    head = lm.lm_head
    if lm.config.tie_word_embeddings:
        lm.lm_head = Int8TiedHead(embedding)
    elif f"{prefix}lm_head.weight_scale" in keys:
        lm.lm_head = Int8Linear(head.in_features, head.out_features, head.bias is not None)
    else:
        raise CheckpointError(f"nanovl_int8_embeddings: {prefix}lm_head.weight_scale is missing (untied lm_head)")
    return n + 1


def int8_embedding_state(root: nn.Module, is_vlm: bool) -> dict[str, torch.Tensor]:
    """The writer's side: the token embedding as int8 rows with a scale per row, and lm_head too when
    it is untied (a tied one reuses the embedding's int8 matrix at load)."""
    lm, prefix = (root.language_model, "language_model.") if is_vlm else (root, "")
    names = [n for n, m in lm.named_modules() if type(m) is nn.Embedding]
    if len(names) != 1:
        raise NanovlError(f"--int8-embeddings: expected one token embedding, found {len(names)}")
    mats = {names[0]: lm.get_submodule(names[0]).weight}
    if not lm.config.tie_word_embeddings:
        mats["lm_head"] = lm.lm_head.weight
    state = {}
    for name, w in mats.items():
        state[f"{prefix}{name}.weight"], state[f"{prefix}{name}.weight_scale"] = int8_rows(w.detach())
    return state
