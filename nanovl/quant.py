"""Quantized checkpoints as module swaps the model files never see: ModelOpt FP8 and NVFP4, AutoAWQ int4.

- The scheme is read from the checkpoint (`hf_quant_config.json`, or `quantization_config` in
  config.json), never guessed; an unknown algorithm is refused by name.
- Which Linear layers are quantized is read from the tensors themselves: a layer whose checkpoint has
  `weight_scale` (ModelOpt) or `qweight` (AWQ) becomes a quantized module; the config's
  `exclude_modules` / `ignore` / `modules_to_not_convert` patterns must agree. The releases keep the
  vision tower unquantized; a checkpoint whose vision tower or projector carries quantized tensors
  (`nanovl quantize --include-vision`) gets them swapped the same way.
- Weights stay at their stored size (fp8, packed 4-bit, int32 words); each forward dequantizes one
  layer's weight to the activation dtype and multiplies, so no full-precision copy of the model ever
  exists. Formats (ARCHITECTURE.md section 9):
  - FP8: `weight` float8_e4m3fn [out, in], `weight_scale` fp32 scalar, `input_scale` fp32 scalar
    (kept; this weight-only path does not quantize activations); w = weight * weight_scale.
  - NVFP4: `weight` uint8 [out, in/2], two E2M1 values per byte, the even element in the low nibble;
    `weight_scale` float8_e4m3fn [out, in/16]; `weight_scale_2` fp32; w = e2m1 * block scale * scale_2.
  - INT8 (compressed-tensors W8A8 as vLLM reads it): `weight` int8 [out, in], `weight_scale` fp32
    [out, 1]; activations quantized per token at run time; w = weight * weight_scale.
  - AWQ (AutoAWQ GEMM): `qweight` int32 [in, out/8] and `qzeros` int32 [in/g, out/8], eight 4-bit
    values per word in the order 0, 2, 4, 6, 1, 3, 5, 7; `scales` fp16 [in/g, out];
    w[in, out] = (q - z) * s.
  - nanovl's own extension (`"nanovl_int8_embeddings": true` in the quantization config, with any of
    the above): the token embedding `weight` int8 [vocab, hidden] + `weight_scale` fp32 [vocab, 1], and
    an untied lm_head the same way (INT8 layout); a tied lm_head multiplies by the embedding's matrix.
"""

from __future__ import annotations

import fnmatch
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanovl.errors import CheckpointError
from nanovl.models.packed import release_pages

ALGOS = ("FP8", "NVFP4", "AWQ", "INT8")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # position k of a word holds the value of column AWQ_ORDER[k]


def read_quant_config(model_dir: str | Path, raw: dict) -> dict | None:
    """{"algo": "FP8" | "NVFP4" | "AWQ" | "INT8", "group_size": int, "exclude": [patterns],
    "int8_embeddings": bool} or None."""
    path = Path(model_dir) / "hf_quant_config.json"
    if path.is_file():
        q = json.loads(path.read_text()).get("quantization", {})
        algo, exclude, group = q.get("quant_algo"), q.get("exclude_modules") or [], q.get("group_size")
    elif isinstance(raw.get("quantization_config"), dict):
        q = raw["quantization_config"]
        method = str(q.get("quant_method", "")).lower()
        if method == "awq":
            if q.get("bits", 4) != 4 or str(q.get("version", "gemm")).lower() != "gemm":
                raise CheckpointError(f"AWQ with bits={q.get('bits')} version={q.get('version')}: only 4-bit GEMM")
            algo, exclude, group = "AWQ", q.get("modules_to_not_convert") or [], q.get("group_size", 128)
        elif method == "compressed-tensors":
            groups = list((q.get("config_groups") or {}).values())
            w = groups[0].get("weights", {}) if groups else {}
            a = (groups[0].get("input_activations") or {}) if groups else {}
            w8a8 = w.get("num_bits") == 8 and w.get("type") == "int" and w.get("strategy") == "channel"
            if len(groups) != 1 or not w8a8 or not a.get("dynamic") or a.get("num_bits") != 8:
                raise CheckpointError("compressed-tensors: only int8 per-channel weights with dynamic int8 activations")
            algo, exclude, group = "INT8", q.get("ignore") or [], None
        elif method == "modelopt":
            algo, exclude, group = q.get("quant_algo"), q.get("ignore") or [], q.get("group_size")
        else:
            raise CheckpointError(f"quantization method {method!r} is not supported (modelopt FP8/NVFP4, awq)")
    else:
        return None
    if algo not in ALGOS:
        raise CheckpointError(f"quantization algorithm {algo!r} is not supported (supported: {', '.join(ALGOS)})")
    int8_embeddings = bool(q.get("nanovl_int8_embeddings", False))
    group = group or (16 if algo == "NVFP4" else 128)
    return {"algo": algo, "group_size": group, "exclude": list(exclude), "int8_embeddings": int8_embeddings}


class FP8Linear(nn.Module):
    def __init__(self, inp: int, out: int, bias: bool):
        super().__init__()
        self.register_buffer("weight", torch.empty(out, inp, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.empty((), dtype=torch.float32))
        self.register_buffer("input_scale", torch.empty((), dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    def dequantized(self, dtype) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.weight_scale).to(dtype)

    def forward(self, x):
        return F.linear(x, self.dequantized(x.dtype), self.bias)


class NVFP4Linear(nn.Module):
    def __init__(self, inp: int, out: int, bias: bool, group: int = 16):
        super().__init__()
        if inp % group:
            raise CheckpointError(f"NVFP4 needs in_features divisible by {group}, got {inp}")
        self.group = group
        self.register_buffer("weight", torch.empty(out, inp // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.empty(out, inp // group, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale_2", torch.empty((), dtype=torch.float32))
        self.register_buffer("input_scale", torch.empty((), dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    def dequantized(self, dtype) -> torch.Tensor:
        out, half = self.weight.shape
        nibbles = torch.stack([self.weight & 0xF, self.weight >> 4], dim=-1).reshape(out, 2 * half)  # (out, in)
        values = E2M1.to(self.weight.device)[nibbles.long()]
        scales = self.weight_scale.to(torch.float32).repeat_interleave(self.group, dim=1) * self.weight_scale_2
        return (values * scales).to(dtype)

    def forward(self, x):
        return F.linear(x, self.dequantized(x.dtype), self.bias)


class AWQLinear(nn.Module):
    def __init__(self, inp: int, out: int, bias: bool, group: int = 128):
        super().__init__()
        if out % 8 or inp % group:
            raise CheckpointError(f"AWQ needs out_features % 8 == 0 and in_features % {group} == 0 ({inp}x{out})")
        self.group = group
        self.register_buffer("qweight", torch.empty(inp, out // 8, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(inp // group, out // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(inp // group, out, dtype=torch.float16))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    @staticmethod
    def unpack(words: torch.Tensor) -> torch.Tensor:
        """(rows, cols/8) int32 -> (rows, cols) values 0..15 in column order."""
        shifts = torch.arange(0, 32, 4, device=words.device)
        nib = (words[..., None] >> shifts) & 0xF  # (rows, cols/8, 8): word position k
        order = torch.tensor(AWQ_ORDER, device=words.device).argsort()  # column j sits at position order[j]
        return nib[..., order].reshape(words.shape[0], -1)

    def dequantized(self, dtype) -> torch.Tensor:
        q = self.unpack(self.qweight).to(torch.float32)  # (in, out)
        z = self.unpack(self.qzeros).to(torch.float32).repeat_interleave(self.group, dim=0)
        s = self.scales.to(torch.float32).repeat_interleave(self.group, dim=0)
        return ((q - z) * s).t().to(dtype)  # (out, in)

    def forward(self, x):
        return F.linear(x, self.dequantized(x.dtype), self.bias)


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


class Int8Linear(nn.Module):
    """int8 weights with per-output-channel scales; activations quantized per token on the fly, the
    product in int32 by `torch._int_mm` (AMX / VNNI on these CPUs), rescaled to the input dtype."""

    def __init__(self, inp: int, out: int, bias: bool):
        super().__init__()
        self.register_buffer("weight", torch.empty(out, inp, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out, 1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out)) if bias else None

    def dequantized(self, dtype) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.weight_scale).to(dtype)

    def forward(self, x):
        return int8_linear(x, self.weight, self.weight_scale, self.bias)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias=None) -> torch.Tensor:
    """x (..., in) @ (int8 weight (out, in) * weight_scale (out, 1)).T with x quantized per token."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    scale = (x2.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)  # (tokens, 1)
    xq = torch.round(x2 / scale).clamp(-127, 127).to(torch.int8)
    y = torch._int_mm(xq, weight.t()).float() * scale * weight_scale.t()  # (tokens, out)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], -1)


class Int8Embedding(nn.Module):
    """nanovl's int8 token embedding: rows int8 [vocab, hidden] with one fp32 scale per row; a lookup
    dequantizes only the rows it reads. When the checkpoint ties the embedding to lm_head, the head
    (Int8TiedHead) multiplies by the same int8 matrix, so the matrix exists once, at a quarter of fp32."""

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
    """Swap the token embedding and lm_head for their int8 forms (the `nanovl_int8_embeddings` extension;
    the tensors say which are stored so). Returns the count of modules swapped."""
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


MARKERS = {"FP8": "weight_scale", "NVFP4": "weight_scale", "AWQ": "qweight", "INT8": "weight_scale"}


def swap_quantized_linears(model: nn.Module, qcfg: dict, keys: set[str], prefix: str = "") -> int:
    """Replace, in place, every nn.Linear whose checkpoint tensors are quantized. Returns the count."""
    marker, n = MARKERS[qcfg["algo"]], 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is not nn.Linear or f"{prefix}{full}.{marker}" not in keys:
                continue
            excluded = [p for p in qcfg["exclude"] if fnmatch.fnmatch(full, p) or fnmatch.fnmatch(prefix + full, p)]
            if excluded:
                raise CheckpointError(
                    f"{prefix}{full} has quantized tensors but the config excludes it ({excluded[0]})"
                )
            inp, out, bias = child.in_features, child.out_features, child.bias is not None
            if qcfg["algo"] == "FP8":
                new = FP8Linear(inp, out, bias)
            elif qcfg["algo"] == "NVFP4":
                new = NVFP4Linear(inp, out, bias, qcfg["group_size"])
            elif qcfg["algo"] == "INT8":
                new = Int8Linear(inp, out, bias)
            else:
                new = AWQLinear(inp, out, bias, qcfg["group_size"])
            setattr(parent, name, new)
            n += 1
    if n == 0:
        raise CheckpointError(f"the config says {qcfg['algo']}, but no tensor carries {marker}: not quantized")
    return n
