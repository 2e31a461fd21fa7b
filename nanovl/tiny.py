"""Tiny random checkpoints in the exact Hugging Face layout, for tests and benchmarks (`nanovl make-tiny`).

A folder holds config.json (release spelling: `rope_theta` + `rope_scaling`, `torch_dtype`),
model.safetensors (or shards plus an index), tokenizer.json (a byte-level BPE trained here in
milliseconds, with the family's special tokens), tokenizer_config.json with a chat template in the
family's turn format, and generation_config.json. transformers loads these folders unchanged, which
the tests check.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nanovl.checkpoint import text_config
from nanovl.models import REGISTRY
from nanovl.weights import save_weights

# Sentences to train the tiny tokenizer on; accents, CJK and emoji give it multi-byte merges.
CORPUS = [
    "The invoice total is 1,234.56 EUR, due on 2024-07-26.",
    "Receipt: 2 x coffee 3.50, 1 x croissant 2.20, total 9.20.",
    "Name: Jane Doe | Date of birth: 12/03/1987 | City: Zürich",
    "Quarterly revenue rose 12% to $4.2 billion; the chart shows Q1 to Q4.",
    "Le café est très bon à Paris. Ñandú, façade, naïve, coöperate.",
    "東京の天気は晴れです。請求書の合計金額。 emoji: 🎉📄✅",
    "def add(a, b):\n    return a + b  # simple code\n",
    "Question: what is the total? Answer: 42. The table has 3 rows and 4 columns.",
]

LLAMA_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if messages and messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = '' %}\n"
    "{%- endif %}\n"
    "{%- if system_message %}\n"
    "    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] not in ['user', 'assistant'] %}\n"
    "        {{- raise_exception('after an optional system message, roles must be user or assistant') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "    {{- message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

CHATML_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {%- if loop.first and message['role'] != 'system' %}\n"
    "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Pre-tokenizer split patterns of the released tokenizers (tiktoken-style; Llama-3 groups up to three
# digits, Qwen2 splits every digit, and Qwen2 NFC-normalises first).
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NEMOTRON_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- set ns = namespace(system='') %}\n"
    "{%- if messages and messages[0]['role'] == 'system' %}\n"
    "    {%- set ns.system = messages[0]['content'] %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- endif %}\n"
    "{{- '<SPECIAL_10>System\\n' + ns.system + '\\n' }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {{- '<SPECIAL_11>User\\n' + message['content'] + '\\n' }}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- '<SPECIAL_11>Assistant\\n' + message['content'] + '\\n<SPECIAL_12>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('roles must be system, user or assistant') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<SPECIAL_11>Assistant\\n' }}\n"
    "    {%- if '/no_think' in ns.system %}{{- '<think></think>' }}{%- endif %}\n"
    "{%- endif %}\n"
)

FAMILIES = {
    "llama": {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "stop": ["<|end_of_text|>", "<|eot_id|>"],
        "template": LLAMA_TEMPLATE,
        "split": LLAMA3_SPLIT,
        "nfc": False,
        "config": {
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            # Llama-3.1's scaling, with a small original context so tests reach positions past it.
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "max_position_embeddings": 512,
            "attention_bias": False,
            "mlp_bias": False,
        },
    },
    "qwen2": {
        "architecture": "Qwen2ForCausalLM",
        "model_type": "qwen2",
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "stop": ["<|im_end|>", "<|endoftext|>"],
        "template": CHATML_TEMPLATE,
        "split": QWEN2_SPLIT,
        "nfc": True,
        "config": {
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_scaling": None,
            "max_position_embeddings": 512,
            "use_sliding_window": False,
            "sliding_window": None,
        },
    },
    "nemotron-h": {
        "architecture": "NemotronHForCausalLM",
        "model_type": "nemotron_h",
        "specials": ["<unk>", "<s>", "</s>", "<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>"],
        "plain": ["<think>", "</think>"],  # added, not special: they stay in decoded text
        "bos": "<s>",
        "eos": "<SPECIAL_12>",
        "stop": ["<SPECIAL_12>", "</s>"],
        "template": NEMOTRON_TEMPLATE,
        "split": LLAMA3_SPLIT,
        "nfc": False,
        "size": {
            "hidden_size": 64,
            "hybrid_override_pattern": "M*-M-*M",
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 128,
            "mamba_num_heads": 8,
            "mamba_head_dim": 16,
            "ssm_state_size": 16,
            "n_groups": 2,
            "tie_word_embeddings": False,
        },
        "config": {
            "conv_kernel": 4,
            "chunk_size": 128,
            "layer_norm_epsilon": 1e-5,
            "use_conv_bias": True,
            "use_bias": False,
            "mlp_bias": False,
            "attention_bias": False,
            "mlp_hidden_act": "relu2",
            "mamba_hidden_act": "silu",
            "max_position_embeddings": 512,
        },
    },
}

TINY_SIZE = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}


def train_tokenizer(
    specials: list[str],
    bos: str | None,
    split: str,
    nfc: bool = False,
    vocab_size: int = 512,
    corpus=None,
    plain: list[str] = (),
):
    """A byte-level BPE with the released tokenizers' pipeline: regex split, then bytes to symbols."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    if nfc:
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus or CORPUS * 4, trainer)
    if plain:
        tk.add_tokens(plain)
    if bos is not None:  # Llama-3 style: BOS added to raw prompts by the post-processor
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tk.token_to_id(bos))]
        )
    return tk


# Vision-language families: a text family, the tokens the release adds, and the top-level config.
VLM_FAMILIES = {
    "nemotron-nano-vl-v1": {
        "text": "llama",
        # Llama-3.1-Nemotron-Nano-VL-8B-V1 appends these after Llama-3.1's vocabulary, <image> first
        "added": ["<image>", "<img>", "</img>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"],
        "config": {
            "architectures": ["Llama_Nemotron_Nano_VL"],
            "model_type": "Llama_Nemotron_Nano_VL",
            "force_image_size": 512,
            "downsample_ratio": 0.5,
            "ps_version": "v2",
            "image_tag_type": "internvl",
            "template": "llama3-chat",
            "vit_hidden_size": 32,
            "projector_hidden_size": 64,
            "vision_config": {
                "architectures": ["RADIOModel"],
                "model_type": "radio",
                "patch_size": 16,
                "max_resolution": 2048,
                "preferred_resolution": [512, 512],
                "args": {
                    "model": "vit_tiny_nanovl",  # not a timm name: the explicit sizes below apply
                    "cpe_max_size": 2048,
                    "register_multiple": 8,
                    "cls_token_per_teacher": True,
                    "teachers": [{"name": "clip"}, {"name": "siglip"}, {"name": "dino_v2"}, {"name": "sam"}],
                },
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 128,
            },
        },
        "preprocessor": {"image_size": 512, "max_num_tiles": 12, "use_thumbnail": True},
    },
    "nvlm-d": {
        "text": "qwen2",
        "added": ["<|vision_pad|>"],  # <Image>, <tile_k> are plain text in NVLM's tokenizer
        "config": {
            "architectures": ["NVLM_D"],
            "model_type": "NVLM_D",
            "force_image_size": 448,
            "downsample_ratio": 0.5,
            "ps_version": "v2",
            "select_layer": -1,
            "template": "chatml",
            "dynamic_image_size": True,
            "use_thumbnail": True,
            "min_dynamic_patch": 1,
            "max_dynamic_patch": 6,
            "vision_config": {
                "architectures": ["InternVisionModel"],
                "model_type": "intern_vit_6b",
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 128,
                "image_size": 448,
                "patch_size": 14,
                "norm_type": "rms_norm",
                "qk_normalization": True,
                "qkv_bias": False,
                "layer_norm_eps": 1e-6,
                "hidden_act": "gelu",
                "initializer_factor": 0.1,
            },
        },
    },
}
VLM_FAMILIES["nemotron-nano-vl-v2"] = {
    "text": "nemotron-h",
    "added": ["<image>", "<img>", "</img>", "<video>"],
    "config": {
        **{k: v for k, v in VLM_FAMILIES["nemotron-nano-vl-v1"]["config"].items() if k not in ("template",)},
        "architectures": ["NemotronH_Nano_VL_V2"],
        "model_type": "NemotronH_Nano_VL_V2",
        "patch_size": 16,
        "projector_hidden_size": 128,
        "norm_mean": [0.48145466, 0.4578275, 0.40821073],
        "norm_std": [0.26862954, 0.26130258, 0.27577711],
        "use_thumbnail": True,
        "max_dynamic_patch": 12,
    },
}
ALL_FAMILIES = [row.tiny for row in REGISTRY.values()]  # one preset per registered architecture
VLM_CONTEXT = 16384  # the 8B's context: room for many tiles


def write_checkpoint(
    family: str,
    out_dir: str | Path,
    size: dict | None = None,
    dtype: str = "float32",
    seed: int = 0,
    max_shard_bytes: int | None = None,
    vocab_size: int | None = None,
    vision: dict | None = None,
    image_size: int | None = None,
    corpus: list[str] | None = None,
    tokenizer_vocab: int = 512,
    max_tiles: int | None = None,
    top: dict | None = None,
) -> Path:
    """Write a random checkpoint of `family` (one of ALL_FAMILIES). `size` overrides the text model's
    size fields, `vision` the vision_config's, `image_size` the tile size and `max_tiles` the tile
    budget, `top` other top-level config fields (VLM families); the tokenizer is trained on `corpus`
    (default: a few built-in sentences) to `tokenizer_vocab` entries."""
    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(ALL_FAMILIES)}")
    vlm = VLM_FAMILIES.get(family)
    text_family = vlm["text"] if vlm else family
    fam = FAMILIES[text_family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = fam["specials"] + (vlm["added"] if vlm else [])
    tk = train_tokenizer(specials, fam["bos"], fam["split"], fam["nfc"], tokenizer_vocab, corpus, fam.get("plain", []))
    tk.save(str(out / "tokenizer.json"))
    ids = {t: tk.token_to_id(t) for t in fam["specials"]}
    stop_ids = [ids[t] for t in fam["stop"]]

    text = {
        "architectures": [fam["architecture"]],
        "model_type": fam["model_type"],
        "vocab_size": vocab_size or tk.get_vocab_size(),
        "hidden_act": "silu",
        "initializer_range": 0.02,
        **fam.get("size", TINY_SIZE),
        **(size or {}),
        **fam["config"],
        "bos_token_id": ids[fam["bos"]] if fam["bos"] else None,
        "eos_token_id": ids[fam["eos"]] if text_family == "qwen2" else stop_ids,
        "torch_dtype": dtype,
    }
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    if "hybrid_override_pattern" in text:  # the Nemotron-H releases write both
        text["num_hidden_layers"] = len(text["hybrid_override_pattern"])
    if vlm:
        text["max_position_embeddings"] = VLM_CONTEXT
        if family == "nvlm-d":
            text["model_type"] = "llama"  # as in NVLM-D-72B's llm_config: Qwen2 layers, "llama" type
        hf = {**vlm["config"], "llm_config": text, "torch_dtype": dtype}
        if vision:
            hf["vision_config"] = {**hf["vision_config"], **vision}
            hf["vit_hidden_size"] = hf["vision_config"]["hidden_size"]
        pre = dict(vlm.get("preprocessor", {}))
        if image_size:
            hf["force_image_size"] = image_size
            pre = {**pre, "image_size": image_size} if pre else pre
        if max_tiles:
            if "max_dynamic_patch" in hf:  # the families whose config.json carries the budget
                hf["max_dynamic_patch"] = max_tiles
            pre = {**pre, "max_num_tiles": max_tiles} if pre else pre
        hf.update(top or {})
        if pre:
            (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    else:
        hf = text
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": text["bos_token_id"], "eos_token_id": stop_ids}, indent=2) + "\n"
    )
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": fam["bos"],
        "eos_token": fam["eos"],
        "pad_token": {"llama": "<|end_of_text|>", "qwen2": "<|endoftext|>"}.get(text_family, "<unk>"),
        "model_max_length": text["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": fam["template"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    model = _meta_model(out, hf, fam["architecture"])
    save_weights(random_state(model, seed, getattr(torch, dtype)), out, max_shard_bytes)
    return out


def _meta_model(out: Path, hf: dict, text_arch: str):
    """The model whose shapes the checkpoint needs, on meta (a VLM reads some sizes from tensor shapes,
    which are given here from the config)."""
    text_cfg = text_config(hf.get("llm_config", hf), text_arch)
    cls = REGISTRY[hf["architectures"][0]].model
    with torch.device("meta"):
        if "llm_config" not in hf:
            return cls(text_cfg)
        pre_path = out / "preprocessor_config.json"
        pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
        return cls(cls.from_checkpoint(hf, text_cfg, cls.config_shapes(hf, text_cfg), pre))


def random_state(model, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """N(0, 0.02) weights like HF's init; norm weights and layer scales near 1 so activations stay in
    range; buffers take the model's documented defaults (RADIO's CLIP constants)."""
    gen = torch.Generator().manual_seed(seed)
    defaults = model.optional_weights() if hasattr(model, "optional_weights") else {}
    kept = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    state = {}
    for name, t in model.state_dict().items():
        if name not in kept:  # the second name of a tied weight
            continue
        if defaults.get(name) is not None:
            state[name] = defaults[name]
            continue
        r = torch.randn(t.shape, generator=gen)
        near_one = name.endswith(("norm.weight", "norm1.weight", "norm2.weight", ".ls1", ".ls2", "mlp1.0.weight"))
        state[name] = (1.0 + 0.1 * r if near_one else 0.02 * r).to(dtype)
    if "vision_model.radio_model.input_conditioner.norm_mean" in state:  # the release carries it, unused
        state["vision_model.radio_model.summary_idxs"] = torch.tensor([0, 1, 2])
    return state
