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
