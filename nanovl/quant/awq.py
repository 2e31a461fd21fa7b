"""AutoAWQ int4 (GEMM): 4-bit weights with a scale and zero point per group; the Linear, the reader, the writer.

- Layout, as AutoAWQ's GEMM kernels store it: `qweight` int32 [in, out/8] and `qzeros` int32
  [in/g, out/8], eight 4-bit values per word in the order 0, 2, 4, 6, 1, 3, 5, 7 (AWQ_ORDER);
  `scales` fp16 [in/g, out]; w[in, out] = (q - z) * s. Group size g is 128 unless the config says.
- The config: `quantization_config` with quant_method awq, bits 4, version gemm (anything else is
  refused); `modules_to_not_convert` lists the layers left as they are (AutoAWQ: name substrings).
- Writing: round-to-nearest asymmetric 4-bit per group after the activation-aware search (AWQ): per
  group of Linear layers sharing an input, a per-channel scale s = mean|x|^alpha multiplies the weights'
  columns and 1/s is folded into what feeds them (the norm, or the previous layer's rows), so the
  function is unchanged and the checkpoint stays a standard AutoAWQ one. search=False: plain rounding.
- On CPUs, inference loads repack these layers for PyTorch's int4 kernel (prepack.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovl.errors import CheckpointError, NanovlError
from nanovl.models.llama import LlamaForCausalLM
from nanovl.quant.calibrate import record_inputs

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # position k of a word holds the value of column AWQ_ORDER[k]


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


def read_config(q: dict) -> tuple[str, list[str], int]:
    """AutoAWQ's quantization config -> ("AWQ", modules_to_not_convert, group size)."""
    if q.get("bits", 4) != 4 or str(q.get("version", "gemm")).lower() != "gemm":
        raise CheckpointError(f"AWQ with bits={q.get('bits')} version={q.get('version')}: only 4-bit GEMM")
    return "AWQ", q.get("modules_to_not_convert") or [], q.get("group_size", 128)


# --- writing ----------------------------------------------------------------------------------------


def int4_codes(w: torch.Tensor, group: int):
    """Round-to-nearest asymmetric 4-bit per group of `group` input columns. w: (out, in) ->
    codes (out, in/group, group) in 0..15, scales and zero points (out, in/group, 1)."""
    out, inp = w.shape
    g = w.reshape(out, inp // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, 15)
    return torch.clamp(torch.round(g / scale) + zero, 0, 15), scale, zero


def fake_quant_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """int4_codes, dequantized back to (out, in)."""
    q, scale, zero = int4_codes(w, group)
    return ((q - zero) * scale).reshape(w.shape)


def awq_groups(layer) -> list[tuple[str, list[nn.Linear], object]]:
    """The Llama-style layer's Linear groups that share an input, and how to fold 1/s before them."""
    attn, mlp = layer.self_attn, layer.mlp

    def into_norm(norm):
        return lambda s: norm.weight.data.div_(s)

    def into_rows(linear):
        def fold(s):
            linear.weight.data.div_(s[:, None])
            if linear.bias is not None:
                linear.bias.data.div_(s)

        return fold

    groups = [("qkv", [attn.q_proj, attn.k_proj, attn.v_proj], into_norm(layer.input_layernorm))]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:  # without GQA, o_proj's input is v_proj's rows
        groups.append(("o", [attn.o_proj], into_rows(attn.v_proj)))
    groups.append(("gate_up", [mlp.gate_proj, mlp.up_proj], into_norm(layer.post_attention_layernorm)))
    groups.append(("down", [mlp.down_proj], into_rows(mlp.up_proj)))
    return groups


@torch.inference_mode()
def awq_scales(model, token_batches, group: int, grid: int = 20) -> dict:
    """Activation-aware scales: per group of Linear layers sharing an input, s = mean|x|^alpha
    (normalised), alpha in [0, 1) on a grid, chosen to minimise the group's output error after
    4-bit fake quantization of W * s (the AWQ search). Returns {(layer index, group name): (s, fold)}."""
    inputs: dict[int, torch.Tensor] = {}

    def record(key, x):
        x = x.reshape(-1, x.shape[-1])
        inputs[key] = torch.cat([inputs[key], x]) if key in inputs else x

    firsts = {id(linears[0]): linears[0] for layer in model.model.layers for _, linears, _ in awq_groups(layer)}
    record_inputs(model, firsts, record, token_batches)
    chosen = {}
    for i, layer in enumerate(model.model.layers):
        for name, linears, fold in awq_groups(layer):
            x = inputs[id(linears[0])]
            mean = x.abs().mean(0).clamp(min=1e-5)
            want = [x @ lin.weight.t() for lin in linears]
            best, best_s = float("inf"), torch.ones_like(mean)
            for k in range(grid):
                s = mean.pow(k / grid)
                s = s / (s.max() * s.min()).sqrt()
                err = sum(float((x @ (fake_quant_int4(lin.weight * s, group) / s).t() - y).pow(2).sum())
                          for lin, y in zip(linears, want))  # fmt: skip
                if err < best:
                    best, best_s = err, s
            chosen[(i, name)] = (best_s, fold, linears)
    return chosen


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """(rows, cols) ints 0..15 -> (rows, cols/8) int32 in AutoAWQ's order (column AWQ_ORDER[k] at nibble k)."""
    rows, cols = values.shape
    v = values.reshape(rows, cols // 8, 8).to(torch.int64)
    word = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for k, col in enumerate(AWQ_ORDER):
        word |= v[..., col] << (4 * k)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def awq_tensors(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors of a (out, in) weight: qweight (in, out/8), qzeros and scales (in/g, out)."""
    q, scale, zero = int4_codes(w, group)
    codes = q.reshape(w.shape).t()  # (in, out)
    zeros, scales = zero[..., 0].t(), scale[..., 0].t()  # (in/group, out)
    return {"qweight": pack_awq(codes.long()), "qzeros": pack_awq(zeros.long()), "scales": scales.half()}


def check_targets(lm: nn.Module, linears: dict[str, nn.Linear], group: int) -> None:
    """What AWQ here can write: a Llama-style block (the search walks it) and layers whose sizes
    divide by the packing's 8 and the group size."""
    if not isinstance(lm, LlamaForCausalLM):  # Qwen2's too
        raise NanovlError("AWQ here covers Llama / Qwen2 language models (not Nemotron-H)")
    for name, m in linears.items():
        if m.out_features % 8:
            raise NanovlError(f"{name}: out_features {m.out_features} does not divide by 8, which AWQ's packing needs")
        if m.in_features % group:
            fits = [g for g in (128, 64, 32) if all(x.in_features % g == 0 for x in linears.values())]
            hint = f"--group-size {fits[0]}" if fits else "a --group-size that divides every layer's in_features"
            raise NanovlError(f"{name}: in_features {m.in_features} does not divide by the group size {group}; "
                              f"pass {hint}")  # fmt: skip


def layer_state(lm: nn.Module, linears: dict[str, nn.Linear], token_batches, group: int, search: bool,
                grid: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """The targets' AWQ tensors; with `search`, the activation-aware scales are searched on the
    batches and folded into `lm` first (in place: give it a copy), else plain round-to-nearest."""
    if search:
        for s, fold, group_linears in awq_scales(lm, token_batches, group, grid).values():
            for lin in group_linears:
                lin.weight.data.mul_(s)
            fold(s)
    state = {}
    for name, m in linears.items():
        state.update({f"{name}.{k}": v for k, v in awq_tensors(m.weight.detach(), group).items()})
    return state


def config_file(cfg: dict, group: int, is_vlm: bool, int8_embeddings: bool) -> dict:
    """The source's config.json with AutoAWQ's `quantization_config` (and float16, AWQ's dtype)."""
    keep = ["lm_head", "vision_model", "mlp1"] if is_vlm else ["lm_head"]  # AutoAWQ: name substrings
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": keep}  # fmt: skip
    if int8_embeddings:
        cfg["quantization_config"]["nanovl_int8_embeddings"] = True
    if is_vlm:
        cfg["llm_config"] = {**cfg.get("llm_config", {}), "torch_dtype": "float16"}
    cfg["torch_dtype"] = "float16"
    return cfg
