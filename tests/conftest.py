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


def document_lines(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    names = ["Northwind", "Contoso", "Fabrikam", "Tailspin", "Litware", "Adatum", "Proseware", "Wingtip"]
    items = ["coffee", "paper", "toner", "chairs", "desks", "cables", "laptops", "pens"]
    out = []
    for _ in range(n):
        who, what, q, p = rng.choice(names), rng.choice(items), rng.randrange(1, 50), rng.randrange(1, 999)
        out.append(rng.choice([
            f"Invoice from {who}: {q} {what} at {p}.00 EUR each.",
            f"Receipt {rng.randrange(1000, 9999)} total {p}.{rng.randrange(10, 99)} paid by card.",
            f"{who} ordered {q} boxes of {what} on {rng.randrange(1, 28)} May.",
            f"The table shows {what} sales of {p} units for {who}.",
        ]))  # fmt: skip
    return out


@pytest.fixture(scope="session")
def trained_llama(tmp_path_factory):
    """A small Llama trained here on templated document lines; other lines of the same kind are for
    calibration and held-out perplexity."""
    from nanovl.checkpoint import load_text_model
    from nanovl.tiny import write_checkpoint
    from nanovl.tokenizer import Tokenizer
    from nanovl.weights import save_weights

    lines = document_lines(400)
    root = tmp_path_factory.mktemp("trained")
    d = write_checkpoint("llama", root / "model", size={"hidden_size": 128, "intermediate_size": 256}, seed=5)
    model, _ = load_text_model(d, dtype="float32")
    model.train().requires_grad_(True)
    tk = Tokenizer(d)
    data = [torch.tensor([tk.encode(t)]) for t in lines[:300]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for step in range(400):
        ids = data[step % len(data)]
        loss = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    (d / "model.safetensors").unlink()
    save_weights({k: v.detach() for k, v in model.state_dict().items()}, d)
    (root / "calibration.txt").write_text("\n".join(lines[300:]))  # a quarter held out, the rest calibrates
    return d, root / "calibration.txt"
