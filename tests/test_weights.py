"""Strict loading: every defect in a checkpoint folder names the key and the file."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovl.checkpoint import load_text_model
from nanovl.errors import CheckpointError
from nanovl.weights import save_weights


@pytest.fixture
def ckpt(tiny_llama, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    return d


def rewrite(d, edit):
    state = load_file(d / "model.safetensors")
    edit(state)
    save_file(state, d / "model.safetensors")


def test_missing_tensor_names_key(ckpt):
    rewrite(ckpt, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight.*model\.safetensors"
    ):
        load_text_model(ckpt)


def test_unexpected_tensor_names_key_and_file(ckpt):
    rewrite(ckpt, lambda s: s.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor model\.layers\.0\.extra\.weight in model\.safetensors"
    ):
        load_text_model(ckpt)


def test_misshaped_tensor_names_shapes(ckpt):
    rewrite(ckpt, lambda s: s.__setitem__("model.norm.weight", torch.ones(65)))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight in model\.safetensors has shape \[65\].*\[64\]"):
        load_text_model(ckpt)


def test_corrupt_file(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_text_model(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_text_model(ckpt)


def test_pickle_checkpoints_are_refused_unopened(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_text_model(ckpt)


def test_sharded_round_trip_and_missing_shard(ckpt, tmp_path):
    state = load_file(ckpt / "model.safetensors")
    out = tmp_path / "sharded"
    shutil.copytree(ckpt, out)
    (out / "model.safetensors").unlink()
    paths = save_weights(state, out, max_shard_bytes=100_000)
    assert len(paths) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    a, _ = load_text_model(ckpt)
    b, _ = load_text_model(out)
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)
    paths[1].unlink()
    with pytest.raises(CheckpointError, match=f"shard {paths[1].name}.*missing"):
        load_text_model(out)


def test_loaded_weights_are_the_file_tensors(ckpt):
    model, _ = load_text_model(ckpt, dtype="float32")
    assert not any(p.is_meta for p in model.parameters())
    ref = load_file(ckpt / "model.safetensors")
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, ref["model.layers.0.self_attn.q_proj.weight"])


def test_unsupported_architecture_lists_supported(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match="unsupported architecture GPTBigCodeForCausalLM; supported: .*LlamaForCausalLM"
    ):
        load_text_model(ckpt)


def test_bf16_load_from_fp32_checkpoint(ckpt):
    model, _ = load_text_model(ckpt, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
