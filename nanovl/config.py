"""Model configs read from a checkpoint's own `config.json`.

- Plain dataclasses with the Hugging Face field names; unknown keys are ignored on read.
- Both spellings are read wherever the releases and current transformers differ:
  `rope_scaling` + `rope_theta` (the Llama-3.1 / Qwen2 releases) and `rope_parameters` (transformers 5),
  `torch_dtype` and `dtype`.
- A vision-language checkpoint nests its text config as `llm_config` or `text_config`, and keeps the
  language model's weights under `language_model.`; `CheckpointConfig` records both.
- The text architecture is taken from `architectures`, not `model_type`: NVLM-D-72B's `llm_config`
  says `model_type: llama` over Qwen2 layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from nanovl.errors import CheckpointError

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    @classmethod
    def from_hf(cls, d: dict) -> RopeConfig:
        # transformers 5: {"rope_parameters": {"rope_type": ..., "rope_theta": ..., ...}}
        # releases:       {"rope_theta": ..., "rope_scaling": {"rope_type" | "type": ..., ...} | null}
        params = dict(d.get("rope_scaling") or {})
        params.update(d.get("rope_parameters") or {})
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise CheckpointError(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        rope = cls(theta=float(theta), type=rope_type, factor=float(params.get("factor", 1.0)))
        if rope_type == "llama3":
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in params:
                    raise CheckpointError(f"llama3 rope scaling needs {key!r} in config.json")
            rope.low_freq_factor = float(params["low_freq_factor"])
            rope.high_freq_factor = float(params["high_freq_factor"])
            rope.original_max_position_embeddings = int(params["original_max_position_embeddings"])
        return rope


@dataclass
class TextConfig:
    """A decoder-only transformer LM (Llama-3.1, Qwen2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig = field(default_factory=RopeConfig)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    dtype: str = "float32"

    @classmethod
    def from_hf(cls, d: dict, architecture: str) -> TextConfig:
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise CheckpointError(f"config.json lacks {', '.join(missing)} for {architecture}")
        if d.get("use_sliding_window"):
            raise CheckpointError("sliding-window attention (use_sliding_window: true) is not supported")
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        return cls(
            architecture=architecture,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope=RopeConfig.from_hf(d),
            hidden_act=d.get("hidden_act", "silu"),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False),
            mlp_bias=d.get("mlp_bias", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            pad_token_id=d.get("pad_token_id"),
            dtype=d.get("torch_dtype") or d.get("dtype") or "float32",
        )

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise CheckpointError(f"hidden_act {self.hidden_act!r} is not supported (supported: silu)")

    @property
    def pattern(self) -> str:
        """The layer pattern in Nemotron-H's letters: every layer attends."""
        return "*" * self.num_hidden_layers


LAYER_CODES = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
LAYER_TYPE_NAMES = {
    "linear_attention": "M",
    "mamba": "M",
    "full_attention": "*",
    "attention": "*",
    "mlp": "-",
    "moe": "E",
}


@dataclass
class NemotronHConfig:
    """Nemotron-H: a stack of Mamba2 (M), attention (*) and MLP (-) layers given by a pattern string."""

    architecture: str
    vocab_size: int
    hidden_size: int
    pattern: str  # one character per layer: M, *, -
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    mamba_num_heads: int
    mamba_head_dim: int
    ssm_state_size: int
    n_groups: int
    conv_kernel: int
    chunk_size: int
    max_position_embeddings: int
    layer_norm_epsilon: float = 1e-5
    use_conv_bias: bool = True
    use_bias: bool = False  # in_proj / out_proj of the Mamba mixers
    mlp_bias: bool = False
    attention_bias: bool = False
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: str = "float32"

    @classmethod
    def from_hf(cls, d: dict, architecture: str) -> NemotronHConfig:
        # releases: `hybrid_override_pattern` ("M-M*-..."); transformers 5: `layers_block_type` (names)
        if d.get("hybrid_override_pattern"):
            pattern = d["hybrid_override_pattern"]
        elif d.get("layers_block_type") or d.get("layer_types"):
            names = d.get("layers_block_type") or d["layer_types"]
            unknown = [n for n in names if n not in LAYER_TYPE_NAMES]
            if unknown:
                raise CheckpointError(f"unknown Nemotron-H layer type {unknown[0]!r}")
            pattern = "".join(LAYER_TYPE_NAMES[n] for n in names)
        else:
            raise CheckpointError("config.json has neither hybrid_override_pattern nor layers_block_type")
        if "E" in pattern:
            raise CheckpointError("Nemotron-H mixture-of-experts layers (E) are not supported")
        if set(pattern) - set("M*-"):
            raise CheckpointError(f"bad hybrid_override_pattern {pattern!r}: use M, * and -")
        required = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "mamba_num_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise CheckpointError(f"config.json lacks {', '.join(missing)} for {architecture}")
        if d.get("mlp_hidden_act", "relu2") != "relu2" or d.get("mamba_hidden_act", "silu") != "silu":
            raise CheckpointError("only relu2 MLPs and silu Mamba activations are supported")
        eos = d.get("eos_token_id")
        limit = d.get("time_step_limit") or (0.0, float("inf"))
        heads = d["num_attention_heads"]
        return cls(
            architecture=architecture,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            pattern=pattern,
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            intermediate_size=d["intermediate_size"],
            mamba_num_heads=d["mamba_num_heads"],
            mamba_head_dim=d.get("mamba_head_dim", 64),
            ssm_state_size=d.get("ssm_state_size", 128),
            n_groups=d.get("n_groups", d.get("mamba_n_groups", 8)),
            conv_kernel=d.get("conv_kernel", d.get("mamba_d_conv", 4)),
            chunk_size=d.get("chunk_size", d.get("mamba_chunk_size", 128)),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            use_conv_bias=d.get("use_conv_bias", True),
            use_bias=d.get("use_bias", False),
            mlp_bias=d.get("mlp_bias", False),
            attention_bias=d.get("attention_bias", False),
            time_step_limit=(float(limit[0]), float(limit[1]) if not isinstance(limit[1], dict) else float("inf")),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            dtype=d.get("torch_dtype") or d.get("dtype") or "float32",
        )

    @property
    def num_hidden_layers(self) -> int:
        return len(self.pattern)


@dataclass
class CheckpointConfig:
    """What a checkpoint folder holds: the top-level architecture and its language model."""

    architecture: str  # config.json `architectures[0]`
    text: TextConfig | NemotronHConfig
    text_prefix: str  # weight-name prefix of the language model: "" or "language_model."
    raw: dict  # the whole config.json, for the parts later modules read


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
