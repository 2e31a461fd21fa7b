import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from nanovl.tiny import write_checkpoint  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("tiny-llama"), seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return write_checkpoint("qwen2", tmp_path_factory.mktemp("tiny-qwen2"), seed=2)


@pytest.fixture(params=["llama", "qwen2"])
def tiny_ckpt(request, tiny_llama, tiny_qwen2):
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}[request.param]


@pytest.fixture(scope="session")
def tiny_v1(tmp_path_factory):
    return write_checkpoint("nemotron-nano-vl-v1", tmp_path_factory.mktemp("tiny-nano-vl-v1"), seed=3)


@pytest.fixture(scope="session")
def tiny_nvlm(tmp_path_factory):
    return write_checkpoint("nvlm-d", tmp_path_factory.mktemp("tiny-nvlm-d"), seed=4)


@pytest.fixture(scope="session")
def tiny_v2(tmp_path_factory):
    return write_checkpoint("nemotron-nano-vl-v2", tmp_path_factory.mktemp("tiny-nano-vl-v2"), seed=5)


def reference_parts(checkpoint, tmp_path, llm_class):
    """A tiny RADIO-based VLM checkpoint split into transformers references on the same tensors:
    (config, state, RadioModel, the LLM). The RADIO and LLM tensors keep their release names."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import RadioConfig, RadioModel

    cfg = json.loads((checkpoint / "config.json").read_text())
    state = load_file(checkpoint / "model.safetensors")
    v = cfg["vision_config"]
    radio_dir, llm_dir = tmp_path / "radio", tmp_path / "llm"
    sizes = {k: v[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
    RadioConfig(
        **sizes, patch_size=16, max_img_size=2048, num_cls_tokens=4, num_registers=4, summary_idxs=[0, 1, 2]
    ).save_pretrained(radio_dir)
    part = lambda prefix: {k[len(prefix) :]: t for k, t in state.items() if k.startswith(prefix)}  # noqa: E731
    save_file(part("vision_model."), radio_dir / "model.safetensors")
    llm_dir.mkdir()
    (llm_dir / "config.json").write_text(json.dumps(cfg["llm_config"]))
    save_file(part("language_model."), llm_dir / "model.safetensors")
    return cfg, state, RadioModel.from_pretrained(radio_dir).eval(), llm_class.from_pretrained(llm_dir).eval()
