"""NemotronH_Nano_VL_V2 against transformers' nemotron_h_omni pieces on the same tensors.

nemotron_h_omni is a later release that shares V2's structure: C-RADIO without its input conditioner,
pixel shuffle v2, an RMSNorm -> Linear -> ReLU^2 -> Linear projector without biases, Nemotron-H.
Where it differs, the test does what V2 does: omni packs images of any resolution into one sequence
(V2 cuts fixed 512 tiles, fed here as a dense batch); omni adds a vision LayerNorm when its LLM has MTP
layers (V2's has none, nor does this config); omni's RADIO carries a video patch projection (unused);
omni's projector RMSNorm multiplies its weight in fp32 (identical in this fp32 test).
"""

import pytest
import torch
from conftest import reference_parts
from transformers import NemotronHForCausalLM
from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
    NemotronH_Omni_Reasoning_V3,
    NemotronH_Omni_Reasoning_V3MultiModalProjector,
)

import nanovl
from nanovl.tiling import make_tiles


@pytest.fixture(scope="module")
def v2(tiny_v2):
    return nanovl.load(tiny_v2, dtype="float32")


def test_v2_matches_nemotron_h_omni_pieces(v2, tiny_v2, tmp_path):
    cfg, state, radio, llm = reference_parts(tiny_v2, tmp_path, NemotronHForCausalLM)
    v = cfg["vision_config"]
    radio.make_preprocessor_external()  # as omni and V2: the processor normalises
    width = 4 * v["hidden_size"]
    proj = NemotronH_Omni_Reasoning_V3MultiModalProjector(
        width, cfg["projector_hidden_size"], cfg["llm_config"]["hidden_size"]
    )
    proj.load_state_dict(
        {
            "layer_norm.weight": state["mlp1.0.weight"],
            "linear_1.weight": state["mlp1.1.weight"],
            "linear_2.weight": state["mlp1.3.weight"],
        }
    )

    from PIL import Image

    image = Image.effect_mandelbrot((900, 600), (-2, -1, 1, 1), 60).convert("RGB")
    prompt = v2.prepare([image], "What is shown?")
    pixels = make_tiles(image, v2.tiles, prompt.plans[0])
    with torch.no_grad():
        feats = radio(pixels).features  # (tiles, 1024, C)
        grid = feats.view(feats.shape[0], 32, 32, -1)
        shuffled = NemotronH_Omni_Reasoning_V3.pixel_shuffle(None, grid, 0.5).reshape(feats.shape[0], -1, width)
        ref_embeds_img = proj(shuffled)
        ids = torch.tensor(prompt.ids)
        embeds = llm.get_input_embeddings()(ids).clone()
        embeds[ids == v2.context_id] = ref_embeds_img.flatten(0, 1)
        want = llm(inputs_embeds=embeds[None]).logits[0]
        got = v2.model(embeds=prompt.embeds[None])[0]
    assert (prompt.features - ref_embeds_img).abs().max().item() < 1e-4
    assert (got - want).abs().max().item() < 1e-4


def test_v2_preprocessing_is_torch_bicubic_antialias(v2):
    from PIL import Image

    image = Image.effect_mandelbrot((700, 300), (-2, -1, 1, 1), 40).convert("RGB")
    spec = v2.tiles
    assert spec.rule == "internvl" and spec.resize == "torch" and spec.mean is not None
    plan = nanovl.tiling.plan_tiles(spec, *image.size)
    x = torch.from_numpy(__import__("numpy").array(image)).permute(2, 0, 1)[None].float()
    cols, rows = plan.grid
    big = torch.nn.functional.interpolate(x, size=(rows * 512, cols * 512), mode="bicubic", antialias=True) / 255
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    tiles = make_tiles(image, spec, plan)
    assert torch.allclose(tiles[0], (big[0, :, :512, :512] - mean) / std, atol=1e-5)
    assert tiles.shape[0] == plan.tiles


def test_v2_ask_thinks_and_answers(v2):
    from PIL import Image

    page = Image.new("RGB", (600, 400), "white")
    a = v2.ask(page, "Total?", max_new_tokens=8, system="/think")
    b = v2.ask(page, "Total?", max_new_tokens=8, think=True)  # the switch is that system prompt
    assert a.token_ids == b.token_ids and a.finish_reason in ("stop", "length")
    off = v2.prepare(v2.load_images(page), "Total?", system="/no_think")
    assert v2.tokenizer.decode(off.ids).endswith("<SPECIAL_11>Assistant\n<think></think>")
    assert a.text.endswith(a.answer) and (a.reasoning is None) == ("</think>" not in a.text)
