"""CPU inference swaps of the vision side (checkpoint.pack_vision, quant/prepack.py): prepacked bf16
encoders and projectors agree with the plain ones, the fused GELU is the GELU of the matmul, and after a
load glibc keeps freed tensors for reuse instead of unmapping them."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanovl.checkpoint import load_vlm
from nanovl.quant.prepack import PackedLinear, packing_supported

needs_bf16 = pytest.mark.skipif(
    not packing_supported(torch.bfloat16, torch.device("cpu")), reason="this CPU has no oneDNN bf16 support"
)


@needs_bf16
def test_fused_gelu_is_the_gelu_of_the_matmul():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 160).bfloat16()
    x = torch.randn(70, 96, generator=g).bfloat16()
    exact = F.gelu(F.linear(x.float(), linear.weight.float(), linear.bias.float()))
    with torch.no_grad():
        fused = PackedLinear(linear)(x, post="gelu").float()
    assert (fused - exact).abs().max().item() <= 1e-2 * exact.abs().max().item()  # bf16 rounding of the output
    assert (fused - F.gelu(exact)).abs().max().item() > 1e-2  # and not applied twice


@needs_bf16
@pytest.mark.parametrize("family", ["tiny_v1", "tiny_nvlm"])
def test_packed_vision_matches_plain(family, request):
    path = request.getfixturevalue(family)
    plain, _ = load_vlm(path, dtype="bfloat16")
    packed, _ = load_vlm(path, dtype="bfloat16", pack=True)
    packed_layers = [m for m in packed.vision_model.modules() if isinstance(m, PackedLinear)]
    assert packed_layers and isinstance(packed.mlp1[1], PackedLinear)
    size = 512 if family == "tiny_v1" else 448
    pixels = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = plain.encode_images(pixels).float(), packed.encode_images(pixels).float()
    assert (a - b).norm() <= 2e-2 * a.norm(), float((a - b).norm() / a.norm())


HEAP_PROBE = """
import ctypes, torch
from nanovl.quant.prepack import keep_freed_memory
names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in names]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
applied = keep_freed_memory()
x = torch.empty(100 << 20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd
del x
print(applied, mapped >= 100 << 20, libc.mallinfo2().fordblks >= 100 << 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("keep", [True, False])
def test_freed_tensors_stay_for_reuse(keep):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["NANOVL_KEEP_HEAP"] = "1" if keep else "0"
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], env=env, capture_output=True, text=True, check=True)
    applied, mapped, kept = out.stdout.split()
    # kept: a 100 MB tensor came from the heap and its memory stays there once freed; else mmap, then munmap
    assert (applied, mapped, kept) == ((str(keep), "False", "True") if keep else ("False", "True", "False"))
