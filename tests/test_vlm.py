"""The vision-language models end to end on tiny random checkpoints."""

import pytest
import torch
from conftest import reference_parts
from PIL import Image
from transformers import LlamaForCausalLM

import nanovl
from nanovl.api import VisionLanguageModel
from nanovl.errors import RequestError


@pytest.fixture(scope="module")
def v1(tiny_v1):
    return nanovl.load(tiny_v1, dtype="float32")


@pytest.fixture(scope="module")
def nvlm(tiny_nvlm):
    return nanovl.load(tiny_nvlm, dtype="float32")


def page(w=900, h=1200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def shuffle_reference(feats):
    """Pixel shuffle v2 from its definition: each output token is its 2x2 block, row-major."""
    n, length, c = feats.shape
    s = int(length**0.5)
    g = feats.view(n, s, s, c)
    blocks = [g[:, 0::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 0::2], g[:, 1::2, 1::2]]
    return torch.cat(blocks, dim=-1).reshape(n, -1, 4 * c)


def test_nano_vl_v1_matches_a_reference_pipeline(v1, tiny_v1, tmp_path):
    """RADIO (transformers) -> pixel shuffle (from its definition) -> mlp1 (torch.nn) -> Llama
    (transformers) on the same checkpoint tensors gives the logits nanovl gives."""
    cfg, state, radio, llm = reference_parts(tiny_v1, tmp_path, LlamaForCausalLM)
    v = cfg["vision_config"]
    mlp1 = torch.nn.Sequential(
        torch.nn.LayerNorm(4 * v["hidden_size"]),
        torch.nn.Linear(4 * v["hidden_size"], 64),
        torch.nn.GELU(),
        torch.nn.Linear(64, cfg["llm_config"]["hidden_size"]),
    )
    mlp1.load_state_dict({k[len("mlp1.") :]: t for k, t in state.items() if k.startswith("mlp1.")})

    prompt = v1.prepare([page()], "What is the total?")
    assert [p.grid for p in prompt.plans] == [(3, 4)]  # 13 tiles: the full budget
    pixels = torch.cat(
        [__import__("nanovl.tiling", fromlist=["make_tiles"]).make_tiles(page(), v1.tiles, prompt.plans[0])]
    )
    with torch.no_grad():
        ref_feats = mlp1(shuffle_reference(radio(pixels).features))
        ids = torch.tensor(prompt.ids)
        ref_embeds = llm.get_input_embeddings()(ids).clone()
        ref_embeds[ids == v1.context_id] = ref_feats.flatten(0, 1)
        want = llm(inputs_embeds=ref_embeds[None]).logits[0]
        got = v1.model(embeds=prompt.embeds[None])[0]
    assert (prompt.features - ref_feats).abs().max().item() < 1e-4
    assert (got - want).abs().max().item() < 1e-4


def test_v1_prompt_format(v1):
    prompt = v1.prepare([page(), page(600, 300, 1)], "Compare the totals.")
    tk = v1.tokenizer
    img, end, ctx = (tk.token_to_id(t) for t in ("<img>", "</img>", "<image>"))
    ids = prompt.ids
    starts = [i for i, t in enumerate(ids) if t == img]
    assert len(starts) == 2
    for start, plan in zip(starts, prompt.plans):
        n = plan.image_tokens
        assert ids[start + 1 : start + 1 + n] == [ctx] * n and ids[start + 1 + n] == end
    assert sum(t == ctx for t in ids) == sum(p.image_tokens for p in prompt.plans)
    text = tk.decode(ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<img>")
    assert text.endswith("</img>\nCompare the totals.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # each image's embeddings sit at its own context positions, in order
    positions = torch.tensor(ids) == ctx
    assert torch.equal(prompt.embeds[positions], prompt.features.flatten(0, 1))


def test_nvlm_prompt_format(nvlm):
    prompt = nvlm.prepare([page(1000, 500)], "Describe <image> please.")
    (plan,) = prompt.plans
    assert plan.grid == (2, 1) and plan.thumbnail and plan.tiles == 3
    text = nvlm.tokenizer.decode(prompt.ids)
    pad = "<|vision_pad|>" * 256
    assert f"Describe <Image><tile_1>{pad}<tile_2>{pad}<tile_global_thumbnail>{pad}</Image> please." in text
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    single = nvlm.prepare([page(400, 400)], "Q")  # one tile: tagged as the thumbnail
    assert f"<Image><tile_global_thumbnail>{pad}</Image>" in nvlm.tokenizer.decode(single.ids)


@pytest.mark.parametrize("family", ["v1", "nvlm"])
def test_ask_and_stream_agree(family, v1, nvlm):
    m = {"v1": v1, "nvlm": nvlm}[family]
    assert isinstance(m, VisionLanguageModel)
    images = [page(700, 500, 3)]
    a = m.ask(images, "What is the total?", max_new_tokens=12)
    assert len(a.token_ids) >= 1 and a.finish_reason in ("stop", "length")
    assert "".join(m.stream(images, "What is the total?", max_new_tokens=12)) == a.text
    feats = m.vlm.vision_features(torch.rand(2, 3, m.tiles.tile_size, m.tiles.tile_size))
    assert feats.shape == (2, 256, 4 * m.vlm.config.vision.hidden_size)
    assert m.vlm.project(feats).shape == (2, 256, m.config.hidden_size)


def test_images_that_do_not_fit_the_context(v1, caplog):
    many = [page(1600, 1600, i) for i in range(8)]  # each 3x3 + thumbnail: 8 x 10 x 256 = 20,480 > 16,384
    with pytest.raises(RequestError, match=r"8 image\(s\) at up to 12 tiles each take 20480 tokens.*context of 16384"):
        v1.prepare(many, "Q", max_tiles=12)
    prompt = v1.prepare(many, "Q", reserve=64)  # no explicit budget: it shrinks to fit, and says so
    assert len(prompt.ids) + 64 <= 16384 and max(p.tiles for p in prompt.plans) < 13
    assert "tiles per image to fit 8 images" in caplog.text
    with pytest.raises(RequestError, match="placeholders"):
        v1.prepare(many[:2], "only one <image> here")


def test_align_corners_switch_reaches_the_encoder(tiny_v1):
    on = nanovl.load(tiny_v1, dtype="float32", align_corners=True)
    off = nanovl.load(tiny_v1, dtype="float32")
    assert on.vlm.config.vision.align_corners and not off.vlm.config.vision.align_corners
    x = torch.rand(1, 3, 512, 512)
    with torch.no_grad():
        assert not torch.allclose(on.vlm.vision_features(x), off.vlm.vision_features(x))
