"""Long context: a Nemotron-H-shaped model against a Llama-shaped model of similar size, both in nanovl.

    python benchmarks/long_context.py [--contexts 1024 8192 32768] [--steps 16]

For each context length: the cache memory (KV for attention layers; conv + SSM state for Mamba layers)
and decode tokens/s with that much context in the cache. To reach 32K tokens on 2 CPU cores in
minutes, the cache is filled with random keys, values and states rather than by a prefill: a decode
step costs the same whatever the cached values are. The prefill itself is timed at the smallest
context, where it runs for real. bf16, batch 1, random weights.
"""

from __future__ import annotations

import argparse
import time

import torch

from nanovl.config import NemotronHConfig, TextConfig
from nanovl.models.llama import LlamaForCausalLM
from nanovl.models.nemotron_h import NemotronHForCausalLM
from nanovl.quant.prepack import pack_linears, packing_supported

VOCAB = 32768


def build(cls, cfg):
    torch.manual_seed(0)
    model = cls(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.linspace(1, 16, p.numel())))
            elif "norm" in name or name.endswith((".D", "dt_bias")):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    if packing_supported(torch.bfloat16, torch.device("cpu")):
        pack_linears(model)
    return model


def llama():
    cfg = TextConfig(
        architecture="LlamaForCausalLM",
        vocab_size=VOCAB,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=65536,
        rms_norm_eps=1e-5,
    )
    return build(LlamaForCausalLM, cfg)


def nemotron_h():
    cfg = NemotronHConfig(
        architecture="NemotronHForCausalLM",
        vocab_size=VOCAB,
        hidden_size=1024,
        pattern="M-M-M*-M-M-M*-M-M-",  # 9 Mamba, 7 MLP, 2 attention layers
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=7168,
        mamba_num_heads=32,
        mamba_head_dim=64,
        ssm_state_size=64,
        n_groups=8,
        conv_kernel=4,
        chunk_size=128,
        max_position_embeddings=65536,
    )
    return build(NemotronHForCausalLM, cfg)


def fill(cache, ctx: int):
    kv = getattr(cache, "kv", cache)
    kv.k[:, :, :, :ctx].normal_(0, 1)
    kv.v[:, :, :, :ctx].normal_(0, 1)
    if hasattr(cache, "ssm"):
        cache.ssm.normal_(0, 0.1)
        cache.conv.normal_(0, 0.1)
    cache.pos = ctx


def decode_rate(model, ctx: int, steps: int) -> tuple[float, object]:
    cache = model.make_cache(1, ctx + steps + 1)
    fill(cache, ctx)
    token = torch.ones(1, 1, dtype=torch.long)
    with torch.inference_mode():
        model(token, cache=cache)  # warm-up step
        t0 = time.perf_counter()
        for _ in range(steps):
            model(token, cache=cache)
        return steps / (time.perf_counter() - t0), cache


def prefill_seconds(model, n: int) -> float:
    ids = torch.randint(0, VOCAB, (1, n))
    cache = model.make_cache(1, n + 1)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(ids, cache=cache, last_only=True)
        return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16, batch 1\n")
    models = {"llama": llama(), "nemotron-h": nemotron_h()}
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters()) + sum(
            m.packed.numel() for m in model.modules() if hasattr(m, "packed")
        )
        print(
            f"{name}: {params / 1e6:.0f} M parameters, prefill of {args.contexts[0]} tokens "
            f"{prefill_seconds(model, args.contexts[0]):.2f} s"
        )
    print(f"\n{'model':>11} {'context':>8} {'KV MB':>8} {'Mamba state MB':>15} {'decode tok/s':>13} {'x llama':>8}")
    for ctx in args.contexts:
        rates = {}
        for name, model in models.items():
            rate, cache = decode_rate(model, ctx, args.steps)
            rates[name] = rate
            kv = getattr(cache, "kv", cache)
            mamba = (cache.ssm.numel() * 4 + cache.conv.numel() * 2) / 1e6 if hasattr(cache, "ssm") else 0.0
            kv_mb = 2 * kv.k[:, :, :, :ctx].numel() * kv.k.element_size() / 1e6
            ratio = rate / rates["llama"]
            print(f"{name:>11} {ctx:>8} {kv_mb:>8.1f} {mamba:>15.2f} {rate:>13.2f} {ratio:>8.2f}")
            del cache


if __name__ == "__main__":
    main()
