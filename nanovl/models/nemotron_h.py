"""Nemotron-H: the hybrid Mamba2 / attention decoder of NVIDIA-Nemotron-Nano-VL-12B-V2.

- The layer stack is the pattern string: M = Mamba2 mixer, * = attention, - = MLP. Every layer is
  x += mixer(rmsnorm(x)), one sub-block per layer; a final RMSNorm (`norm_f`), then lm_head.
- Attention: GQA, no bias, and no positional encoding at all (no RoPE): order comes from the Mamba
  layers. MLP: down(relu(up(x))^2), no gate.
- Mamba2 mixer: in_proj -> [z | xBC | dt] with xBC = [x | B | C]; depthwise causal conv1d (kernel 4)
  + SiLU over xBC; dt = softplus(dt + dt_bias), clamped to the config's time_step_limit; A = -exp(A_log);
  the SSM y = SSD(x, dt, A, B, C) + D * x, with B and C shared by the heads of a group; then a gated
  RMSNorm (RMSNorm of y * silu(z) in groups of d_inner / n_groups) and out_proj.
- Prefill runs the SSD chunked scan (Mamba2's state-space duality: quadratic attention-like form inside
  chunks of `chunk_size`, a linear recurrence between chunks); decode runs the one-step recurrence.
  Both read and write the HybridCache (conv and SSM state per Mamba layer, KV per attention layer).
- Padding tokens (left padding of a batch) are zeroed before in_proj and after the conv, so they leave
  the state untouched and a padded row computes what it would alone.
Module names mirror the release (`backbone.layers.N.mixer.in_proj`, `backbone.norm_f`, `lm_head`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovl.config import NemotronHConfig
from nanovl.models.cache import HybridCache, SlotCache
from nanovl.models.layers import causal_mask, output_positions


class RMSNorm(nn.Module):
    """Nemotron-H's RMSNorm multiplies the weight in fp32, then casts (Llama's casts first)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z), normalised in groups of `group` channels (norm_before_gate=False)."""

    def __init__(self, dim: int, group: int, eps: float):
        super().__init__()
        self.group, self.eps = group, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y, z):
        dtype = y.dtype
        h = y.float() * F.silu(z.float())
        g = h.view(*h.shape[:-1], -1, self.group)  # (..., groups, group)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(h.shape).to(dtype)


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a: (..., L) -> (..., L, L) with [i, j] = a[j+1] + ... + a[i] for j <= i and -inf above the
    diagonal; summed directly (not as a difference of cumulative sums) to stay exact in fp32."""
    L = a.shape[-1]
    grid = a[..., :, None].expand(*a.shape, L)  # [i, j] = a[i]
    strictly_lower = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), -1)
    sums = grid.masked_fill(~strictly_lower, 0).cumsum(-2)  # sum over i' <= i of a[i'] for i' > j
    return sums.masked_fill(~torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device)), float("-inf"))


SEGMENT_CHUNKS = 16  # chunks scanned at once: bounds the (chunks, heads, chunk, chunk) decay tensors


def ssd_scan(x, dt, A, B, C, chunk: int, state=None, segment: int = SEGMENT_CHUNKS):
    """The SSM over a sequence, chunk by chunk. x: (b, T, h, p); dt: (b, T, h) after softplus;
    A: (h,) negative; B, C: (b, T, h, n) (already one per head); state: (b, h, p, n) or None.
    Returns y (b, T, h, p) without the D skip, and the final state (b, h, p, n). All fp32.
    Long sequences go `segment` chunks at a time, the state carried across, so memory stays flat."""
    step = segment * chunk
    if x.shape[1] > step:
        ys = []
        for i in range(0, x.shape[1], step):
            part = slice(i, i + step)
            y, state = _ssd_scan(x[:, part], dt[:, part], A, B[:, part], C[:, part], chunk, state)
            ys.append(y)
        return torch.cat(ys, dim=1), state
    return _ssd_scan(x, dt, A, B, C, chunk, state)


def _ssd_scan(x, dt, A, B, C, chunk: int, state=None):
    b, T, h, p = x.shape
    n = B.shape[-1]
    pad = (-T) % chunk  # zero-padding: dt = 0 neither decays the state nor feeds it
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = (T + pad) // chunk
    x, B, C = (t.reshape(b, c, chunk, h, -1) for t in (x, B, C))  # (b, c, l, h, p|n)
    dt = dt.reshape(b, c, chunk, h)
    xdt = x * dt[..., None]  # the input each step feeds the state
    a = (dt * A).permute(0, 1, 3, 2)  # (b, c, h, l): log-decay of each step
    a_cum = a.cumsum(-1)

    # within a chunk: y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + ... + a_i) xdt_j
    decay = torch.exp(segment_sums(a))  # (b, c, h, l_i, l_j)
    scores = torch.einsum("bcihn,bcjhn->bchij", C, B) * decay
    y = torch.einsum("bchij,bcjhp->bcihp", scores, xdt)

    # each chunk's own contribution to the state at its end, then the recurrence across chunks
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, c, h, l)
    chunk_states = torch.einsum("bcjhn,bchj,bcjhp->bchpn", B, to_end, xdt)
    s = torch.zeros(b, h, p, n, device=x.device) if state is None else state.float()
    starts = []
    for k in range(c):
        starts.append(s)
        s = s * torch.exp(a_cum[:, k, :, -1])[..., None, None] + chunk_states[:, k]
    start = torch.stack(starts, dim=1)  # (b, c, h, p, n): the state entering each chunk

    # the state entering the chunk, decayed to each position and read out through C
    y = y + torch.einsum("bcihn,bchpn->bcihp", C, start) * torch.exp(a_cum).permute(0, 1, 3, 2)[..., None]
    return y.reshape(b, c * chunk, h, p)[:, :T], s


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: NemotronHConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.head_dim = cfg.mamba_num_heads, cfg.mamba_head_dim
        self.groups, self.state = cfg.n_groups, cfg.ssm_state_size
        self.d_inner = self.heads * self.head_dim
        self.conv_dim = self.d_inner + 2 * self.groups * self.state
        self.kernel, self.chunk = cfg.conv_kernel, cfg.chunk_size
        self.dt_limit = cfg.time_step_limit
        self.in_proj = nn.Linear(cfg.hidden_size, self.d_inner + self.conv_dim + self.heads, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=cfg.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.heads))
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.groups, cfg.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, hidden, cache: HybridCache | None = None, valid=None):
        bsz, T, _ = hidden.shape
        if valid is not None:
            hidden = hidden * valid[..., None].to(hidden.dtype)
        z, xBC, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.heads], dim=-1)

        # depthwise causal conv over time, continuing from the cached last kernel-1 inputs
        history, state = cache.mamba_state(self.layer) if cache is not None else (None, None)
        if history is None:
            history = xBC.new_zeros(bsz, self.conv_dim, self.kernel - 1)
        window = torch.cat([history, xBC.transpose(1, 2)], dim=-1)  # (b, conv_dim, kernel-1 + T)
        xBC = F.silu(F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)).transpose(1, 2)
        if valid is not None:
            xBC = xBC * valid[..., None].to(xBC.dtype)
        x, B, C = xBC.split([self.d_inner, self.groups * self.state, self.groups * self.state], dim=-1)

        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)  # (b, T, h)
        A = -torch.exp(self.A_log.float())
        x = x.float().view(bsz, T, self.heads, self.head_dim)
        per_group = self.heads // self.groups
        B = B.float().view(bsz, T, self.groups, self.state).repeat_interleave(per_group, dim=2)  # (b, T, h, n)
        C = C.float().view(bsz, T, self.groups, self.state).repeat_interleave(per_group, dim=2)
        if T == 1 and state is not None:  # decode: one step of the recurrence
            s = (
                state * torch.exp(dt[:, 0] * A)[..., None, None]
                + (x[:, 0] * dt[:, 0, :, None])[..., None] * B[:, 0, :, None, :]
            )
            y = torch.einsum("bhpn,bhn->bhp", s, C[:, 0])[:, None]
        else:
            y, s = ssd_scan(x, dt, A, B, C, self.chunk, state)
        if cache is not None:
            cache.set_mamba_state(self.layer, window[:, :, -(self.kernel - 1) :], s)
        y = y + x * self.D.float()[:, None]
        y = self.norm(y.reshape(bsz, T, self.d_inner).to(hidden.dtype), z)
        return self.out_proj(y)


class Attention(nn.Module):
    def __init__(self, cfg: NemotronHConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=bias)

    def forward(self, x, cache=None, mask=None):
        bsz, T, _ = x.shape
        q = self.q_proj(x).view(bsz, T, self.heads, self.head_dim).transpose(1, 2)  # (b, H, T, D)
        k = self.k_proj(x).view(bsz, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        causal = mask is None and T > 1
        if causal and k.shape[2] != T:
            mask, causal = causal_mask(T, k.shape[2], x.device), False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.kv_heads != self.heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(bsz, T, -1))


class ReluSquaredMLP(nn.Module):
    def __init__(self, cfg: NemotronHConfig, layer: int):
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.relu(self.up_proj(x)).square())


MIXERS = {"M": Mamba2Mixer, "*": Attention, "-": ReluSquaredMLP}


class Block(nn.Module):
    def __init__(self, cfg: NemotronHConfig, layer: int):
        super().__init__()
        self.kind = cfg.pattern[layer]
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mixer = MIXERS[self.kind](cfg, layer)

    def forward(self, x, cache, mask, valid):
        h = self.norm(x)
        if self.kind == "M":
            return x + self.mixer(h, cache, valid)
        if self.kind == "*":
            return x + self.mixer(h, cache, mask)
        return x + self.mixer(h)


class Backbone(nn.Module):
    def __init__(self, cfg: NemotronHConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)


class NemotronHForCausalLM(nn.Module):
    recurrent = True  # Mamba state: padding would decay it and packed samples would share it

    def __init__(self, cfg: NemotronHConfig):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.norm_f.weight.dtype  # not the embedding's: that one may be int8

    @property
    def device(self) -> torch.device:
        return self.backbone.embeddings.weight.device

    def make_cache(self, batch: int, max_len: int) -> HybridCache:
        return HybridCache(self.config, batch, max_len, self.dtype, self.device)

    def make_slot_cache(self, slots: int, max_len: int) -> SlotCache:
        return SlotCache(self.config, slots, max_len, self.dtype, self.device)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backbone.embeddings(tokens)

    def forward(
        self,
        tokens=None,
        positions=None,
        cache=None,
        mask=None,
        embeds=None,
        last_only=False,
        valid=None,
        last_index=None,
    ):
        """As LlamaForCausalLM.forward; positions are unused (no positional encoding), and `valid`
        (B, T) marks real tokens so padding stays out of the Mamba state."""
        x = self.embed(tokens) if embeds is None else embeds
        for layer in self.backbone.layers:
            x = layer(x, cache, mask, valid)
        if cache is not None:
            cache.advance(x.shape[1])
        x = output_positions(x, last_only, last_index)
        return self.lm_head(self.backbone.norm_f(x))
