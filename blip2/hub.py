"""Model resolution: a local checkpoint directory, or a hub id fetched once into the Hugging Face cache."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"

# What loading needs, and nothing else (no .bin when safetensors exist, no TF/Flax weights).
_COMMON = ["config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
           "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
           "added_tokens.json"]
_SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
_BIN = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]


class HubError(OSError):
    """A hub id could not be resolved to a local checkpoint."""


def resolve(model: str | os.PathLike) -> Path:
    """A checkpoint directory for `model`: itself when it is a local directory, else the hub snapshot
    of that id (downloading what is missing; HF_HUB_OFFLINE=1 uses only the cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name}: not a checkpoint directory, nor a hub id like {DEFAULT_MODEL}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        directory = Path(snapshot_download(name, allow_patterns=_COMMON + _SAFETENSORS))
        if not any(directory.glob("*.safetensors")):
            directory = Path(snapshot_download(name, allow_patterns=_COMMON + _BIN))
    except RepositoryNotFoundError:
        raise HubError(f"{name}: no such model on the hub (or it is private)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"cannot fetch {name} from the hub and it is not in the cache ({reason}); "
                       "without network access, pass a local checkpoint directory") from None
    if not (directory / "config.json").exists():
        raise HubError(f"{name}: the hub snapshot has no config.json")
    return directory
