"""The model registry: one row per checkpoint `architectures` name, saying what it builds.

- A row names the nn.Module class, the config class of a text architecture (a vision-language
  checkpoint's nested `llm_config` / `text_config` names its own text architecture, built from that
  architecture's row), the Hugging Face `model_type` (for nested configs that name no architectures)
  and the `nanovl.tiny` preset that writes a random checkpoint of it for tests.
- Everything else a caller needs is a field or method of the model class, never sniffed: the cache
  it makes (`make_cache`, `make_slot_cache`), whether prompts can share a padded or packed row
  (`recurrent`), a VLM's tiling (`tile_spec`), prompt text (`image_text`, `context_token`) and
  weight-name prefixes.
- Adding a family: one model file, one row here, one preset in nanovl/tiny.py (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from nanovl.config import NemotronHConfig, TextConfig
from nanovl.errors import CheckpointError
from nanovl.models.llama import LlamaForCausalLM
from nanovl.models.nemotron_h import NemotronHForCausalLM
from nanovl.models.qwen2 import Qwen2ForCausalLM
from nanovl.models.vlm import NVLMD, NemotronNanoVL, NemotronNanoVLV2, VisionLanguageModule


@dataclass(frozen=True)
class Architecture:
    model: type  # a causal LM, or a VisionLanguageModule (which names its LM's class as text_class)
    tiny: str  # the nanovl.tiny preset
    config: type | None = None  # a text architecture's config class (from_hf(dict, architecture))
    model_type: str | None = None  # a text architecture's Hugging Face model_type

    @property
    def vlm(self) -> bool:
        return issubclass(self.model, VisionLanguageModule)


REGISTRY: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(LlamaForCausalLM, "llama", TextConfig, "llama"),
    "Qwen2ForCausalLM": Architecture(Qwen2ForCausalLM, "qwen2", TextConfig, "qwen2"),
    "NemotronHForCausalLM": Architecture(NemotronHForCausalLM, "nemotron-h", NemotronHConfig, "nemotron_h"),
    "Llama_Nemotron_Nano_VL": Architecture(NemotronNanoVL, "nemotron-nano-vl-v1"),
    "NVLM_D": Architecture(NVLMD, "nvlm-d"),
    "NemotronH_Nano_VL_V2": Architecture(NemotronNanoVLV2, "nemotron-nano-vl-v2"),
}


def architecture(name: str) -> Architecture:
    """The registry row of a checkpoint's `architectures` name; an error listing what is supported."""
    if name not in REGISTRY:
        raise CheckpointError(f"unsupported architecture {name}; supported: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def is_vlm(name: str) -> bool:
    return name in REGISTRY and REGISTRY[name].vlm


def text_architecture(model_type: str | None) -> str | None:
    """The text architecture of a Hugging Face model_type (nested configs that name no architectures)."""
    return next((name for name, a in REGISTRY.items() if a.model_type and a.model_type == model_type), None)


def text_config_class(name: str) -> type:
    """The config class of a text architecture (TextConfig, the Llama-style one, when unknown: loading
    its model then fails with the supported list)."""
    row = REGISTRY.get(name)
    return row.config if row is not None and row.config is not None else TextConfig


def text_model_class(ckpt) -> type:
    """The language-model class of a checkpoint (a VLM's nested text architecture)."""
    top = architecture(ckpt.architecture)
    text = REGISTRY.get(ckpt.text.architecture)
    if text is None or text.vlm:
        raise CheckpointError(
            f"unsupported architecture {ckpt.architecture} (text model {ckpt.text.architecture}); "
            f"supported: {', '.join(REGISTRY)}"
        )
    if top.vlm and top.model.text_class is not text.model:
        raise CheckpointError(
            f"{ckpt.architecture} has a {top.model.text_class.__name__} language model, "
            f"not {ckpt.text.architecture}"
        )
    return text.model
