"""The vision encoders against transformers' reference classes on the same random weights."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import InternVLVisionConfig, InternVLVisionModel, RadioConfig, RadioModel

from nanovl.checkpoint import load_radio
from nanovl.models.intern_vit import InternVisionModel, InternViTConfig
from nanovl.models.projector import pixel_shuffle
from nanovl.weights import load_weights


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if ("norm" in name or "lambda" in name) else 0.05 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def radio_pair(tmp_path_factory):
    cfg = RadioConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=16,
        max_img_size=1024,
        num_cls_tokens=4,
        num_registers=4,
    )
    ref = randomize(RadioModel(cfg), 0)
    path = tmp_path_factory.mktemp("radio")
    ref.save_pretrained(path)
    return ref, path


@pytest.mark.parametrize("hw", [(512, 512), (256, 384), (384, 128), (1024, 1024)], ids=str)
def test_radio_matches_transformers(radio_pair, hw):
    ref, path = radio_pair
    ours = load_radio(path)
    assert ours.cfg.num_prefix_tokens == 8 and ours.cfg.pos_grid == (64, 64) and ours.cfg.layer_scale
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x).features
        got = ours(x)
    assert got.shape == want.shape == (2, hw[0] * hw[1] // 256, 64)
    assert (got - want).abs().max().item() < 1e-4


def test_radio_align_corners_switch(radio_pair):
    """align_corners=True resizes the position grid as old RADIO did: checked against F.interpolate."""
    _, path = radio_pair
    ours = load_radio(path, align_corners=True)
    pg = ours.model.patch_generator
    grid = pg.pos_embed.reshape(1, 64, 64, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=True).flatten(2).transpose(1, 2)
    with torch.no_grad():
        assert torch.allclose(pg.position_embedding(32, 32, torch.float32), want, atol=1e-6)
        # non-square: resize to the longer side, then crop the top-left window
        square = F.interpolate(grid, size=(24, 24), mode="bilinear", align_corners=True)[:, :, :16, :24]
        assert torch.allclose(pg.position_embedding(16, 24, torch.float32), square.flatten(2).transpose(1, 2))
    plain = load_radio(path)  # default False differs from True
    with torch.no_grad():
        assert not torch.allclose(plain.model.patch_generator.position_embedding(32, 32, torch.float32), want)


def to_release_names(state: dict) -> dict:
    """transformers' InternVLVisionModel names -> InternViT release names (fused qkv)."""
    out = {
        "embeddings.class_embedding": state["embeddings.cls_token"],
        "embeddings.patch_embedding.weight": state["embeddings.patch_embeddings.projection.weight"],
        "embeddings.patch_embedding.bias": state["embeddings.patch_embeddings.projection.bias"],
        "embeddings.position_embedding": state["embeddings.position_embeddings"],
    }
    n = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    for i in range(n):
        src, dst = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        a = src + "attention."
        out[dst + "attn.qkv.weight"] = torch.cat([state[a + f"{x}_proj.weight"] for x in "qkv"])
        out[dst + "attn.proj.weight"] = state[a + "projection_layer.weight"]
        out[dst + "attn.proj.bias"] = state[a + "projection_layer.bias"]
        out[dst + "attn.q_norm.weight"] = state[a + "q_norm.weight"]
        out[dst + "attn.k_norm.weight"] = state[a + "k_norm.weight"]
        for fc in ("fc1", "fc2"):
            for t in ("weight", "bias"):
                out[dst + f"mlp.{fc}.{t}"] = state[src + f"mlp.{fc}.{t}"]
        out[dst + "norm1.weight"] = state[src + "layernorm_before.weight"]
        out[dst + "norm2.weight"] = state[src + "layernorm_after.weight"]
        out[dst + "ls1"] = state[src + "lambda_1"]
        out[dst + "ls2"] = state[src + "lambda_2"]
    return out


@pytest.mark.parametrize("size", [448, 336])
def test_intern_vit_matches_transformers(tmp_path, size):
    """InternViT-6B's structure (RMSNorm, QK-norm over the full width, layer scale, no qkv bias)
    expressed in transformers' InternVLVisionConfig."""
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160, image_size=448)
    sizes.update(patch_size=14, norm_type="rms_norm", layer_norm_eps=1e-6)
    hf_cfg = InternVLVisionConfig(
        **sizes, use_qk_norm=True, attention_bias=False, layer_scale_init_value=0.1, use_mean_pooling=True
    )
    ref = randomize(InternVLVisionModel(hf_cfg), 2)
    release = {k: v.contiguous() for k, v in to_release_names(ref.state_dict()).items()}
    save_file(release, tmp_path / "model.safetensors")
    cfg = InternViTConfig.from_hf({**sizes, "qk_normalization": True, "qkv_bias": False})
    with torch.device("meta"):
        ours = InternVisionModel(cfg)
    load_weights(ours, tmp_path)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(x).last_hidden_state[:, 1:]
        got = ours(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_is_2x2_blocks(version):
    side, c = 8, 3
    x = torch.randn(2, side * side, c)
    got = pixel_shuffle(x, 0.5, version)
    assert got.shape == (2, 16, 4 * c)
    grid = x.view(2, side, side, c)
    for r in range(4):
        for col in range(4):
            block = torch.cat(
                [
                    grid[:, 2 * r, 2 * col],
                    grid[:, 2 * r, 2 * col + 1],
                    grid[:, 2 * r + 1, 2 * col],
                    grid[:, 2 * r + 1, 2 * col + 1],
                ],
                dim=-1,
            )
            index = r * 4 + col if version == "v2" else col * 4 + r  # v1 leaves the grid transposed
            assert torch.equal(got[:, index], block)
