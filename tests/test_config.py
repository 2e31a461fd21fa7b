"""config.json reading: both spellings of rope, nested text configs, dispatch on `architectures`."""

import json

import pytest

from nanovl.checkpoint import load_config
from nanovl.errors import CheckpointError
from nanovl.models import text_model_class
from nanovl.models.qwen2 import Qwen2ForCausalLM

TEXT = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
)
LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


def write(tmp_path, cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return load_config(tmp_path)


def test_llama31_release_spelling(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], **TEXT, "rope_theta": 500000.0, "rope_scaling": LLAMA31_ROPE}
    cfg["eos_token_id"] = [128001, 128008, 128009]
    c = write(tmp_path, cfg)
    t = c.text
    assert (t.rope.type, t.rope.theta, t.rope.factor, t.rope.original_max_position_embeddings) == (
        "llama3",
        500000.0,
        8.0,
        8192,
    )
    assert t.head_dim == 128 and t.num_key_value_heads == 8 and t.eos_token_ids == [128001, 128008, 128009]
    assert c.text_prefix == ""


def test_transformers5_spelling_reads_the_same(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], **TEXT, "rope_parameters": {**LLAMA31_ROPE, "rope_theta": 500000.0}}
    a = write(tmp_path, cfg).text.rope
    cfg = {"architectures": ["LlamaForCausalLM"], **TEXT, "rope_theta": 500000.0, "rope_scaling": LLAMA31_ROPE}
    assert write(tmp_path, cfg).text.rope == a


def test_old_rope_scaling_type_key(tmp_path):
    rope = {**LLAMA31_ROPE}
    rope["type"] = rope.pop("rope_type")
    c = write(tmp_path, {"architectures": ["LlamaForCausalLM"], **TEXT, "rope_scaling": rope})
    assert c.text.rope.type == "llama3" and c.text.rope.theta == 10000.0


@pytest.mark.parametrize("key", ["llm_config", "text_config"])
def test_nvlm_nested_text_config_dispatches_on_architectures(tmp_path, key):
    # NVLM-D-72B's llm_config says model_type "llama" over Qwen2 layers; architectures decides.
    llm = {"architectures": ["Qwen2ForCausalLM"], "model_type": "llama", **TEXT, "rope_theta": 1e6}
    c = write(tmp_path, {"architectures": ["NVLM_D"], key: llm, "vision_config": {}})
    assert c.text_prefix == "language_model." and c.text.architecture == "Qwen2ForCausalLM"
    assert text_model_class(c) is Qwen2ForCausalLM and c.text.rope.theta == 1e6


def test_unknown_rope_type_is_refused(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], **TEXT, "rope_scaling": {"rope_type": "longrope", "factor": 4}}
    with pytest.raises(CheckpointError, match="rope type 'longrope' is not supported"):
        write(tmp_path, cfg)


def test_llama3_rope_without_its_fields_is_refused(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], **TEXT, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(CheckpointError, match="low_freq_factor"):
        write(tmp_path, cfg)


def test_missing_fields_and_bad_json(tmp_path):
    with pytest.raises(CheckpointError, match="lacks hidden_size"):
        write(
            tmp_path, {"architectures": ["LlamaForCausalLM"], **{k: v for k, v in TEXT.items() if k != "hidden_size"}}
        )
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_config(tmp_path)


def test_sliding_window_is_refused(tmp_path):
    cfg = {"architectures": ["Qwen2ForCausalLM"], **TEXT, "use_sliding_window": True, "sliding_window": 4096}
    with pytest.raises(CheckpointError, match="sliding-window"):
        write(tmp_path, cfg)
