"""CPU speed as a module swap: bf16 Linear layers with oneDNN-prepacked weights.

On these CPUs (AVX-512 BF16 / AMX), `F.linear` in bf16 reads weights at about 60% of the memory
bandwidth when decoding one token at a time; the same weights reordered once into oneDNN's blocked
layout are read at about 80% (numbers in BENCHMARKS.md). Results are bit-identical. This is the packing
that inductor's CPU freezing pass applies, done here once at load time without compiling anything.

The model files never see it: `pack_linears(model)` replaces `nn.Linear` modules in place. Packed
models are for inference only (no autograd, no state_dict round trip). A tied lm_head gets its own
packed copy, since the embedding lookup still needs the plain matrix.
"""

from __future__ import annotations

import ctypes
import functools
import mmap

import torch
from torch import nn

MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now; non-destructive (file pages are re-read if touched)


def release_pages(t: torch.Tensor) -> None:
    """Hint the kernel to drop the pages under `t` from this process. Once a weight is packed, the
    file-backed pages of a zero-copy (memory-mapped) load are no longer needed; without this hint they
    stay mapped and count twice in RSS until the whole file is unmapped. Anonymous pages are untouched
    (no swap), and on other systems the call fails harmlessly."""
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page  # whole pages inside the tensor only
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    libc = _libc()
    if end > start and libc is not None:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT)


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim): repacking at load frees
    many large temporaries that would otherwise stay in this process's resident memory."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "madvise") else None


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, batch_hint: int = 8):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        # (out, in) bf16 -> opaque oneDNN layout; batch_hint picks the blocking (1-8 rows decode best)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)
        release_pages(w)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module) -> nn.Module:
    """Swap every bf16 nn.Linear of `model` for a PackedLinear, in place.

    The packed matrices are new memory. Everything left unpacked (embeddings, norms, biases) is copied
    too, so no tensor still views the checkpoint's memory-mapped file and its pages are released.
    """
    from tqdm import tqdm

    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16
    ]
    for parent, name, child in tqdm(targets, desc="packing bf16 weights", unit="layer", disable=None, leave=False):
        setattr(parent, name, PackedLinear(child))
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
        if isinstance(module, PackedLinear) and module.bias is not None:
            module.bias = module.bias.clone()
    return model
