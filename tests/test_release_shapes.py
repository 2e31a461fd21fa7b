"""The real releases' configs built on the meta device: tensor names and shapes as the releases have
them (../shared/reference/ARCHITECTURE.md, sections 1.6, 3, 6), without a byte of weights."""

import torch

from nanovl.config import NemotronHConfig, TextConfig
from nanovl.models.vlm import NVLMD, NemotronNanoVL, NemotronNanoVLV2

RADIO_ARGS = {"model": "vit_huge_patch16_224", "cpe_max_size": 2048, "register_multiple": 8}
RADIO_SHAPES = {
    "vision_model.radio_model.model.patch_generator.cls_token.token": (8, 1280),
    "vision_model.radio_model.model.patch_generator.pos_embed": (1, 16384, 1280),
}


def shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def llama31_8b():
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    d = dict(
        vocab_size=128512,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=rope,
    )
    return TextConfig.from_hf(d, "LlamaForCausalLM")


def test_nano_vl_8b_release_layout():
    raw = {
        "architectures": ["Llama_Nemotron_Nano_VL"],
        "force_image_size": 512,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "vision_config": {"args": RADIO_ARGS, "patch_size": 16},
    }
    cfg = NemotronNanoVL.from_checkpoint(
        raw, llama31_8b(), {**RADIO_SHAPES, "mlp1.1.weight": (4096, 5120)}, {"max_num_tiles": 12, "use_thumbnail": True}
    )
    with torch.device("meta"):
        s = shapes(NemotronNanoVL(cfg))
    assert s["vision_model.radio_model.model.patch_generator.embedder.weight"] == (1280, 768)
    assert s["vision_model.radio_model.model.blocks.31.attn.qkv.weight"] == (3840, 1280)
    assert s["vision_model.radio_model.model.blocks.31.mlp.fc1.weight"] == (5120, 1280)
    assert "vision_model.radio_model.model.blocks.32.norm1.weight" not in s
    assert s["vision_model.radio_model.input_conditioner.norm_mean"] == (3, 1, 1)
    assert (s["mlp1.0.weight"], s["mlp1.0.bias"], s["mlp1.1.weight"], s["mlp1.1.bias"]) == (
        (5120,),
        (5120,),
        (4096, 5120),
        (4096,),
    )
    assert (s["mlp1.3.weight"], s["mlp1.3.bias"]) == ((4096, 4096), (4096,))
    assert s["language_model.model.embed_tokens.weight"] == (128512, 4096)
    assert s["language_model.model.layers.31.self_attn.k_proj.weight"] == (1024, 4096)
    assert s["language_model.model.layers.31.mlp.gate_proj.weight"] == (14336, 4096)
    assert s["language_model.lm_head.weight"] == (128512, 4096)
    assert cfg.tiles.tokens_per_tile == 256 and cfg.tiles.max_tiles == 12
    n = sum(torch.Size(v).numel() for v in s.values())
    assert 8.6e9 < n < 8.8e9  # ~8.7 B: Llama-3.1-8B + ViT-H + projector


def test_nano_vl_12b_v2_release_layout():
    text = NemotronHConfig.from_hf(
        dict(
            vocab_size=131072,
            hidden_size=5120,
            num_hidden_layers=62,
            num_attention_heads=40,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=20480,
            mamba_num_heads=128,
            mamba_head_dim=80,
            ssm_state_size=128,
            n_groups=8,
            conv_kernel=4,
            chunk_size=128,
            max_position_embeddings=131072,
            hybrid_override_pattern="M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
        ),
        "NemotronHForCausalLM",
    )
    assert (text.pattern.count("M"), text.pattern.count("*"), text.pattern.count("-")) == (28, 6, 28)
    raw = {
        "architectures": ["NemotronH_Nano_VL_V2"],
        "force_image_size": 512,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "vision_config": {"args": RADIO_ARGS, "patch_size": 16},
        "norm_mean": [0.48145466, 0.4578275, 0.40821073],
        "norm_std": [0.26862954, 0.26130258, 0.27577711],
        "use_thumbnail": True,
        "max_dynamic_patch": 12,
    }
    cfg = NemotronNanoVLV2.from_checkpoint(raw, text, {**RADIO_SHAPES, "mlp1.1.weight": (20480, 5120)}, {})
    with torch.device("meta"):
        s = shapes(NemotronNanoVLV2(cfg))
    lm = "language_model.backbone.layers."
    assert s[lm + "0.mixer.in_proj.weight"] == (22656, 5120)  # z 10240 + xBC 12288 + dt 128
    assert s[lm + "0.mixer.conv1d.weight"] == (12288, 1, 4) and s[lm + "0.mixer.conv1d.bias"] == (12288,)
    assert s[lm + "0.mixer.A_log"] == s[lm + "0.mixer.D"] == s[lm + "0.mixer.dt_bias"] == (128,)
    assert s[lm + "0.mixer.norm.weight"] == (10240,) and s[lm + "0.mixer.out_proj.weight"] == (5120, 10240)
    assert s[lm + "7.mixer.q_proj.weight"] == (5120, 5120) and s[lm + "7.mixer.k_proj.weight"] == (1024, 5120)
    assert s[lm + "1.mixer.up_proj.weight"] == (20480, 5120) and s[lm + "1.mixer.down_proj.weight"] == (5120, 20480)
    assert s["language_model.backbone.embeddings.weight"] == (131072, 5120)
    assert s["language_model.backbone.norm_f.weight"] == (5120,)
    assert (s["mlp1.0.weight"], s["mlp1.1.weight"], s["mlp1.3.weight"]) == ((5120,), (20480, 5120), (5120, 20480))
    assert "mlp1.1.bias" not in s and not any("input_conditioner" in k for k in s)


def test_nvlm_d_72b_release_layout():
    qwen = TextConfig.from_hf(
        dict(
            vocab_size=152064,
            hidden_size=8192,
            intermediate_size=29568,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
        ),
        "Qwen2ForCausalLM",
    )
    raw = {
        "architectures": ["NVLM_D"],
        "force_image_size": 448,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "max_dynamic_patch": 6,
        "min_dynamic_patch": 1,
        "use_thumbnail": True,
        "select_layer": -1,
        "vision_config": {
            "hidden_size": 3200,
            "num_hidden_layers": 45,
            "num_attention_heads": 25,
            "intermediate_size": 12800,
            "image_size": 448,
            "patch_size": 14,
            "norm_type": "rms_norm",
            "qk_normalization": True,
            "qkv_bias": False,
        },
    }
    cfg = NVLMD.from_checkpoint(raw, qwen, {"mlp1.1.weight": (29568, 12800)}, {})
    with torch.device("meta"):
        s = shapes(NVLMD(cfg))
    v = "vision_model."
    assert s[v + "embeddings.class_embedding"] == (1, 1, 3200)
    assert s[v + "embeddings.patch_embedding.weight"] == (3200, 3, 14, 14)
    assert s[v + "embeddings.position_embedding"] == (1, 1025, 3200)
    assert s[v + "encoder.layers.44.attn.qkv.weight"] == (9600, 3200) and v + "encoder.layers.44.attn.qkv.bias" not in s
    assert s[v + "encoder.layers.44.attn.q_norm.weight"] == (3200,) and s[v + "encoder.layers.44.ls1"] == (3200,)
    assert s["mlp1.0.weight"] == s["mlp1.0.bias"] == (12800,)
    assert s["mlp1.1.weight"] == (29568, 12800) and "mlp1.1.bias" not in s
    assert s["mlp1.3.weight"] == (8192, 29568) and "mlp1.3.bias" not in s
    assert s["language_model.model.layers.79.self_attn.q_proj.bias"] == (8192,)
    assert "language_model.model.layers.79.self_attn.o_proj.bias" not in s
    assert cfg.tiles.tile_size == 448 and cfg.tiles.max_tiles == 6 and cfg.tiles.tokens_per_tile == 256
