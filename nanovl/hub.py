"""`--model` names: a local checkpoint folder, or a Hugging Face hub id resolved through its cache.

- An existing folder always wins, so a folder called `org/name` under the working directory is read
  as it is.
- Anything else shaped like `org/name` is looked up with `huggingface_hub.snapshot_download`, which
  downloads what is missing into the hub cache (HF_HUB_CACHE, by default ~/.cache/huggingface/hub)
  and returns the snapshot folder; with HF_HUB_OFFLINE=1 it only reads the cache.
- Only what nanovl reads is fetched: configs, safetensors, tokenizer files and chat templates; never
  pickles (`*.bin`, `*.pt`) or remote code.
"""

from __future__ import annotations

import re
from pathlib import Path

from nanovl.errors import CheckpointError

# The released checkpoints nanovl runs; README "Models" has their sizes and a download command.
RELEASES = {
    "nvidia/Llama-3.1-Nemotron-Nano-VL-8B-V1": "~17 GB",
    "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16": "~26 GB; also -FP8, -NVFP4-QAD",
    "nvidia/NVLM-D-72B": "~160 GB",
}
MODEL_HINT = "\n".join(
    ["a model is required: --model DIR (a checkpoint folder in the Hugging Face layout) or --model ORG/NAME",
     "(a Hugging Face hub id, downloaded into the hub cache), e.g.",
     *(f"  {name:44} {size}" for name, size in RELEASES.items()),
     "to try nanovl without one: nanovl make-tiny nemotron-nano-vl-v1 /tmp/tiny-vl (a tiny random model)"]
)  # fmt: skip
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as the hub spells repository ids


def resolve_model(name: str | Path) -> Path:
    """A checkpoint folder for `name`: the folder itself, or the hub cache's snapshot of the id."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    name = str(name)
    if path.exists():
        raise CheckpointError(f"{name} is a file; --model takes a checkpoint folder or a Hugging Face id")
    if not HUB_ID.fullmatch(name) or ".." in name:
        raise CheckpointError(f"model folder {name} does not exist (--model takes a folder or a hub id ORG/NAME)")
    return snapshot(name)


def snapshot(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = constants.HF_HUB_OFFLINE  # HF_HUB_OFFLINE=1: the cache only
    hint = f"or download it with `hf download {repo_id} --local-dir DIR` and pass --model DIR"
    try:
        folder = snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=offline)
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such local folder, and no such Hugging Face repository "
                              "(or it is gated: `hf auth login`)") from None  # fmt: skip
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set (unset it to download)" if offline else "the hub cannot be reached"
        raise CheckpointError(f"{repo_id}: no such local folder, not in the hub cache {constants.HF_HUB_CACHE}, "
                              f"and {why}; {hint}") from None  # fmt: skip
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{repo_id}: no such local folder, and the hub download failed ({e}); {hint}") from None
    return Path(folder)
