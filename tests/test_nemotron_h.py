"""Nemotron-H against transformers' NemotronHForCausalLM, and its cache against full forward passes."""

import json

import pytest
import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

from nanovl.checkpoint import load_text_model
from nanovl.engine import SamplingParams, TokenGenerator

CHUNK = 8
PATTERN = ["linear_attention", "full_attention", "mlp", "linear_attention", "mlp", "full_attention", "linear_attention"]


def hf_model():
    cfg = NemotronHConfig(
        vocab_size=320,
        hidden_size=64,
        layers_block_type=PATTERN,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        mamba_num_heads=8,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=2,
        conv_kernel=4,
        chunk_size=CHUNK,
        max_position_embeddings=512,
        layer_norm_epsilon=1e-5,
    )
    model = NemotronHForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.linspace(0.5, 4.0, p.numel())))  # A = -exp(A_log) in [-4, -0.5]
            elif name.endswith(("dt_bias", ".D")):
                p.copy_(0.5 * noise)
            elif "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = hf_model()
    path = tmp_path_factory.mktemp("nemotron-h")
    ref.save_pretrained(path)
    ours, _ = load_text_model(path, dtype="float32")
    return ref, ours, path


def test_config_reads_both_spellings(pair):
    _, ours, path = pair
    assert ours.config.pattern == "M*-M-*M"
    cfg = json.loads((path / "config.json").read_text())
    cfg["hybrid_override_pattern"] = "M*-M-*M"
    del cfg["layers_block_type"]
    from nanovl.config import NemotronHConfig as Ours

    assert Ours.from_hf(cfg, "NemotronHForCausalLM").pattern == "M*-M-*M"


@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 70])
def test_logits_match_transformers(pair, length):
    ref, ours, _ = pair
    ids = torch.randint(0, 320, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids)
    assert (got - want).abs().max().item() < 1e-4


def test_greedy_matches_transformers(pair):
    ref, ours, _ = pair
    prompt = torch.randint(0, 320, (1, 21), generator=torch.Generator().manual_seed(9))
    want = ref.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 21:]
    got = [t[0] for t in TokenGenerator(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=32))]
    assert got == want.tolist()


@pytest.mark.parametrize("lengths", [[1], [CHUNK - 1], [CHUNK], [CHUNK + 1], [3 * CHUNK + 5], [5, 3 * CHUNK + 5, 12]])
def test_cached_decode_equals_full_forward(pair, lengths):
    _, ours, _ = pair
    g = torch.Generator().manual_seed(sum(lengths))
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in lengths]
    gen = TokenGenerator(ours, prompts, SamplingParams(max_new_tokens=12))
    steps = [gen.logits.clone() for _ in gen]
    for row, prompt in enumerate(prompts):
        out = gen.output_ids[row]
        for t, logits in enumerate(steps):
            with torch.no_grad():
                want = ours(torch.tensor([prompt + out[:t]]))[0, -1]
            assert (logits[row] - want).abs().max().item() < 1e-4, (row, t)


def test_mamba_state_is_constant_in_context(pair):
    _, ours, _ = pair
    small, large = ours.make_cache(1, 64), ours.make_cache(1, 4096)
    assert small.conv.shape == large.conv.shape and small.ssm.shape == large.ssm.shape


def test_long_scans_go_in_segments_with_the_same_result():
    from nanovl.models.nemotron_h import ssd_scan

    g = torch.Generator().manual_seed(0)
    b, T, h, p, n = 2, 300, 4, 8, 16
    x, B, C = (
        torch.randn(b, T, h, p, generator=g),
        torch.randn(b, T, h, n, generator=g),
        torch.randn(b, T, h, n, generator=g),
    )
    dt = torch.rand(b, T, h, generator=g) * 0.5
    A = -torch.linspace(0.5, 2.0, h)
    state = torch.randn(b, h, p, n, generator=g)
    whole, s1 = ssd_scan(x, dt, A, B, C, chunk=8, state=state, segment=1000)
    parts, s2 = ssd_scan(x, dt, A, B, C, chunk=8, state=state, segment=3)
    assert torch.allclose(whole, parts, atol=1e-4) and torch.allclose(s1, s2, atol=1e-4)
    # and both equal the plain recurrence, step by step
    s = state.clone()
    ys = []
    for t in range(T):
        s = (
            s * torch.exp(dt[:, t] * A)[..., None, None]
            + (x[:, t] * dt[:, t, :, None])[..., None] * B[:, t, :, None, :]
        )
        ys.append(torch.einsum("bhpn,bhn->bhp", s, C[:, t]))
    assert torch.allclose(whole, torch.stack(ys, 1), atol=1e-3) and torch.allclose(s1, s, atol=1e-3)
