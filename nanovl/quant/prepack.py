"""CPU speed as module swaps at load: weights reordered once into the layout a CPU kernel reads fastest.

- bf16 Linear -> PackedLinear: on these CPUs (AVX-512 BF16 / AMX), `F.linear` in bf16 reads weights at
  about 60% of the memory bandwidth when decoding one token at a time; the same weights reordered once
  into oneDNN's blocked layout are read at about 80% (numbers in BENCHMARKS.md). Results are
  bit-identical without a bias. With one, oneDNN adds it to the fp32 accumulator instead of writing it
  out first and accumulating onto it (addmm), and a vision MLP's GELU runs there too: on an AMX Xeon an
  encoder layer's four matmuls at 4 tiles took 76 ms against 89 ms through addmm and F.gelu. This is
  the packing that inductor's CPU freezing pass applies, done here once at load time without compiling
  anything. A tied lm_head gets its own packed copy, since the embedding lookup still needs the plain
  matrix.
- AWQLinear -> Int4PackedLinear: AutoAWQ's words repacked for PyTorch's CPU int4 kernel, still 4 bits
  a weight; layers the kernel cannot take keep the dequantizing path, with a warning.
- The model files never see it: `pack_linears(model)` and `repack_int4(model, dtype)` replace modules
  in place. Packed models are for inference only (no autograd, no state_dict round trip).
- Memory: the checkpoint's pages under a packed weight are handed back (`release_pages`), and the C
  heap is trimmed after the swaps (`trim_heap`), so resident memory holds each matrix once. After the
  load, freed activations are kept for the next forward instead of being unmapped (`keep_freed_memory`).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import warnings

import torch
from torch import nn

from nanovl.quant.awq import AWQLinear

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


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
KEEP_AT_TOP = 1 << 30  # free memory glibc may keep at the top of its heap before handing it back


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc reuse freed memory for the next large tensor instead of returning it to the system.

    By default every allocation over 32 MB (a vision MLP activation of a few tiles, a prefill's MLP
    activations) is a fresh mmap, freed with munmap, and its pages are faulted in and zeroed again by
    the next op: on a 2-vCPU AMX Xeon the C-RADIO-H encoder took 1.50 s a tile that way and 1.08 s
    with this setting (BENCHMARKS.md). After this call large blocks come from the heap and freed ones
    stay there for the next forward, up to KEEP_AT_TOP bytes at its top: memory use peaks where it
    did, but no longer falls back between forwards (`trim_heap` still hands it back on demand).
    Process-wide and once. Skipped outside glibc, where the user set glibc's own MALLOC_MMAP_MAX_,
    MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_, and with NANOVL_KEEP_HEAP=0. Returns whether
    it applied."""
    own = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    if os.environ.get("NANOVL_KEEP_HEAP") == "0" or any(k in os.environ for k in own):
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_AT_TOP))


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

    fuses_gelu = True  # GeluMLP hands its GELU to the kernel: post="gelu"

    def forward(self, x, post: str = "none"):
        # the bias, and with post="gelu" the exact (erf) GELU, applied by oneDNN to the fp32 accumulator
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, post, [], "none" if post == "gelu" else "")

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def bf16_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, layer) for every plain bf16 nn.Linear of `model`: what the CPU swaps replace."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16
    ]


def pack_linears(model: nn.Module) -> nn.Module:
    """Swap every bf16 nn.Linear of `model` for a PackedLinear, in place.

    The packed matrices are new memory. Everything left unpacked (embeddings, norms, biases) is copied
    too, so no tensor still views the checkpoint's memory-mapped file and its pages are released.
    """
    from tqdm import tqdm

    targets = bf16_linears(model)
    for parent, name, child in tqdm(targets, desc="packing bf16 weights", unit="layer", disable=None, leave=False):
        setattr(parent, name, PackedLinear(child))
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
        if isinstance(module, PackedLinear) and module.bias is not None:
            module.bias = module.bias.clone()
    return model


class Int4PackedLinear(nn.Module):
    """An AWQLinear repacked once at load for PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`,
    the one gpt-fast and torchao use): still 4 bits per weight plus a scale and zero per group, and a
    product that never builds the dequantized matrix. Inference only; `repack_int4` does the swap."""

    def __init__(self, awq: AWQLinear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.group = awq.qweight.shape[0], awq.group
        q = AWQLinear.unpack(awq.qweight).t().to(torch.int32).contiguous()  # (out, in) codes 0..15
        z = AWQLinear.unpack(awq.qzeros).to(torch.float32)  # (in/g, out)
        s = awq.scales.to(torch.float32)
        self.out_features = q.shape[0]
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)  # (out, in/2) uint8
        # the kernel computes w = (q - 8) * scale + zero; AWQ's w = (q - z) * s gives zero = (8 - z) * s
        self.scales_zeros = torch.stack([s, (8 - z) * s], dim=-1).to(dtype)  # (in/g, out, 2)
        self.bias = None if awq.bias is None else awq.bias.detach().to(dtype)
        for t in (awq.qweight, awq.qzeros, awq.scales):  # a memory-mapped load would keep them resident
            release_pages(t)

    def forward(self, x):
        shape, dtype = x.shape, self.scales_zeros.dtype
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(dtype), self.packed, self.group,
                                              self.scales_zeros)  # fmt: skip
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], -1)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}"


def repack_int4(model: nn.Module, dtype: torch.dtype) -> int:
    """Swap every AWQLinear of a CPU model for an Int4PackedLinear, in place. Returns the count. The
    kernel wants out_features divisible by 16 (AWQ only needs 8): other layers keep the slow path."""
    n, kept = 0, []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not AWQLinear or child.qweight.device.type != "cpu":
                continue
            if child.scales.shape[1] % 16:
                kept.append(f"{parent_name}.{name}" if parent_name else name)
                continue
            setattr(parent, name, Int4PackedLinear(child, dtype))
            n += 1
    if kept:
        warnings.warn(f"{len(kept)} AWQ layers (e.g. {kept[0]}) have out_features not divisible by 16: "
                      "they dequantize at every forward, much slower", stacklevel=2)  # fmt: skip
    return n
