"""Parity with transformers: its reference classes, saved with save_pretrained, loaded by nanovl."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from nanovl.checkpoint import load_text_model
from nanovl.engine import SamplingParams, TokenGenerator

SMALL = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def hf_llama(tie=False):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    cfg = LlamaConfig(**SMALL, rope_parameters=rope, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def hf_qwen2():
    rope = {"rope_type": "default", "rope_theta": 1000000.0}
    return Qwen2ForCausalLM(Qwen2Config(**SMALL, rope_parameters=rope, rms_norm_eps=1e-6))


def randomize(model, seed):
    # HF init leaves norms at 1 and biases at 0; perturb everything so every weight matters.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)
    return model.eval()


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def ours_greedy(model, ids, n):
    gen = TokenGenerator(model, [ids], SamplingParams(max_new_tokens=n))
    return [t[0] for t in gen]


CASES = {
    "llama3-rope": lambda: hf_llama(),
    "llama-tied": lambda: hf_llama(tie=True),
    "qwen2": hf_qwen2,
}


@pytest.mark.parametrize("case", CASES)
def test_logits_and_greedy_match_transformers(case, tmp_path):
    ref = randomize(CASES[case](), seed=len(case))
    ref.save_pretrained(tmp_path)
    ours, _ = load_text_model(tmp_path, dtype="float32")

    # 100 tokens: positions run past llama3's original_max_position_embeddings (32)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4

    prompt = ids[0, :40].tolist()
    assert ours_greedy(ours, prompt, 32) == hf_greedy(ref, prompt, 32)


def test_bf16_matches_transformers_bf16(tmp_path):
    ref = randomize(hf_llama(), seed=3)
    ref.save_pretrained(tmp_path)
    ours, _ = load_text_model(tmp_path, dtype="bfloat16")
    assert ours.lm_head.weight.dtype == torch.bfloat16
    ref = ref.to(torch.bfloat16)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids).logits.float(), ours(ids).float()
    # Same op order and roundings as transformers; bf16 matmul kernels may still differ in the last bit.
    assert (got - want).abs().max().item() < 0.02 * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() > 0.95


def test_release_spelling_and_nested_vlm_layout_load(tmp_path):
    """rope_scaling + rope_theta (release spelling), text config nested as llm_config, weights under
    language_model. in shards: the layout of Llama-3.1-Nemotron-Nano-VL-8B-V1."""
    ref = randomize(hf_llama(), seed=4)
    ref.save_pretrained(tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    top = {"architectures": ["Llama_Nemotron_Nano_VL"], "llm_config": cfg, "vision_config": {}}
    (vlm / "config.json").write_text(json.dumps(top))
    state = {"language_model." + k: v for k, v in load_file(tmp_path / "plain" / "model.safetensors").items()}
    state["vision_model.radio_model.model.patch_generator.embedder.weight"] = torch.zeros(8, 8)
    state["mlp1.0.weight"] = torch.zeros(8)
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, part in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, vlm / name)
        weight_map.update(dict.fromkeys(part, name))
    (vlm / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    ours, ckpt = load_text_model(vlm, dtype="float32")
    assert ckpt.text_prefix == "language_model." and ckpt.text.rope.type == "llama3"
    ids = torch.randint(0, SMALL["vocab_size"], (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_transformers_loads_make_tiny_checkpoints(family, tiny_llama, tiny_qwen2, tmp_path):
    """The other direction: our make-tiny folders are exact HF layouts, so transformers reads them."""
    from transformers import AutoModelForCausalLM

    src = {"llama": tiny_llama, "qwen2": tiny_qwen2}[family]
    shutil.copytree(src, tmp_path / "m")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ours, _ = load_text_model(tmp_path / "m")
    ids = torch.randint(0, ours.config.vocab_size, (1, 90), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() < 1e-4
