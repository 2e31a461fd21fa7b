"""LoRA adapters as a module swap: y = base(x) + (alpha / rank) * B(A(x)), base frozen.

- A starts as Kaiming-uniform and B as zeros, so a fresh adapter changes nothing (the LoRA paper's
  initialisation, as in PEFT).
- Adapters are saved apart from the model, in PEFT's layout (adapter_model.safetensors with
  `base_model.model.<module>.lora_A.weight` / `lora_B.weight`, adapter_config.json), and merged into
  the base weights by W += (alpha / rank) * B @ A.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nanovl.errors import CheckpointError

PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:  # code that reads a Linear's weight (dtype, shape) sees the base's
        return self.base.weight

    def forward(self, x):
        y = self.base(x)  # the adapter runs in its own (float32) dtype beside a bf16 base
        return y + (self.scale * self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))).to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        w = self.base.weight.float() + self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        return w.to(self.base.weight.dtype)


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, under: list[str]) -> list[str]:
    """Wrap every nn.Linear named like one of `targets` (last name part; "*" = any) inside the
    submodules `under`; returns the wrapped module names."""
    wrapped = []
    for name, module in list(model.named_modules()):
        if not any(name == u or name.startswith(u + ".") for u in under):
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and ("*" in targets or child_name in targets):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{name}.{child_name}")
    if not wrapped:
        raise CheckpointError(f"no Linear layers named {', '.join(targets)} under {', '.join(under)}")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str, rank: int, alpha: float, targets: list[str]):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), out / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "base_model_name_or_path": str(base_model), "r": rank, "lora_alpha": alpha,
           "target_modules": targets, "modules": sorted(lora_modules(model)), "bias": "none"}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_adapter(model: nn.Module, adapter_dir: str | Path):
    """Wrap the modules the adapter names and load its A / B matrices (strictly)."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{adapter_dir} has no adapter_config.json")
    cfg = json.loads(cfg_path.read_text())
    state = load_file(adapter_dir / "adapter_model.safetensors")
    modules = dict(model.named_modules())
    for name in cfg["modules"]:
        parent, _, child = name.rpartition(".")
        base = getattr(modules[parent], child, None) if parent in modules else None
        if not isinstance(base, nn.Linear):
            raise CheckpointError(f"adapter module {name} is not a Linear layer of this model")
        lora = LoRALinear(base, cfg["r"], cfg["lora_alpha"])
        for part in ("lora_A", "lora_B"):
            key = f"{PEFT_PREFIX}{name}.{part}.weight"
            if key not in state or state[key].shape != getattr(lora, part).weight.shape:
                raise CheckpointError(f"{adapter_dir}: {key} missing or mis-shaped")
            getattr(lora, part).weight.data.copy_(state[key])
        setattr(modules[parent], child, lora)
    return cfg


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base Linear and put the plain Linear back."""
    modules = dict(model.named_modules())
    for name, m in lora_modules(model).items():
        parent, _, child = name.rpartition(".")
        m.base.weight.data = m.merged_weight()
        setattr(modules[parent], child, m.base)
    return model
