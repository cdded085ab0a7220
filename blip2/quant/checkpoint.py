"""Quantized checkpoints: `blip2 quantize` writes one, every loader reads it as written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..checkpoint import Rows, check_ties, checkpoint_files, read_checkpoint, write_safetensors
from ..config import Blip2Config
from ..models.blip2 import Blip2Model
from .formats import Quantization, quantize_weight
from .linear import targets
def stored_quantization(directory: Path) -> Quantization | None:
    """The quantization a checkpoint directory was written with (`blip2 quantize`), or None."""
    raw = json.loads((Path(directory) / "config.json").read_text()).get("quantization")
    return None if raw is None else Quantization.from_json(raw)


def stored_layer_modes(directory: Path) -> dict[str, str]:
    """Each quantized layer of a `blip2 quantize` checkpoint and the mode it is stored in: int4 where
    it has zero points, int8 otherwise (read from the shards' headers). Checkpoints written before the
    Q-Former became int8 in int4 mode keep their int4 Q-Former."""
    keys = {key for key, *_ in read_checkpoint(directory)}
    layers = (key.removesuffix(".scales") for key in keys if key.endswith(".scales"))
    return {name: "int4" if f"{name}.zeros" in keys else "int8" for name in layers}


_SHARD_BYTES = 2 * 10**9


def quantization_targets(src: Path, q: Quantization) -> dict[str, Quantization]:
    """The layers of the float checkpoint in `src` that `q` quantizes, each with how (linear.targets),
    its ties checked against what it stores."""
    with torch.device("meta"):
        model = Blip2Model(Blip2Config.from_file(src))
    check_ties(model, src)
    return targets(model, q)


def write_quantized(src: Path, dst: Path, q: Quantization,
                    calibrated: dict[str, dict[str, torch.Tensor]] | None = None) -> list[Path]:
    """Write the checkpoint in `src` to the new directory `dst` with the target Linear weights in
    portable quantized form, one tensor at a time, in safetensors shards of at most 2 GB (other tensors
    as stored, every tensor aligned for the kernels); config.json gains a "quantization" entry; the
    tokenizer and processor files are copied. Returns the shard paths.

    calibrated: layers already quantized (GPTQ: gptq.calibrated_parts), written as given; the rest
    are rounded to nearest."""
    src, dst = Path(src), Path(dst)
    if stored_quantization(src) is not None:
        raise ValueError(f"{src} is already quantized")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")
    layers = quantization_targets(src, q)
    calibrated = dict(calibrated or {})
    buffers: dict = {}
    dst.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    written: list[tuple[Path, list[str]]] = []

    def flush() -> None:
        written.append((dst / f"part-{len(written) + 1:05d}.safetensors", list(shard)))
        write_safetensors(shard, written[-1][0], metadata={"format": "pt"})
        shard.clear()

    size = 0
    for key, shape, read, _path in read_checkpoint(src):
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in layers:
            parts = calibrated.pop(module, None) or quantize_weight(
                Rows(shape, torch.float32, torch.device("cpu"), read), layers[module], buffers)
            tensors = {f"{module}.{k}": v for k, v in parts.items()}
        else:
            tensors = {key: read(None)}
        for k, v in tensors.items():
            nbytes = v.numel() * v.element_size()
            if shard and size + nbytes > _SHARD_BYTES:
                flush()
                size = 0
            shard[k] = v.contiguous()
            size += nbytes
    flush()
    paths, weight_map = [], {}
    for i, (part, keys) in enumerate(written, 1):
        paths.append(part.rename(dst / f"model-{i:05d}-of-{len(written):05d}.safetensors"))
        weight_map.update(dict.fromkeys(keys, paths[-1].name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    raw = json.loads((src / "config.json").read_text())
    raw["quantization"] = q.to_json()
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    skip = {p.name for p in checkpoint_files(src)} | {"config.json", "model.safetensors.index.json",
                                                      "pytorch_model.bin.index.json"}
    for f in src.iterdir():
        if f.is_file() and f.name not in skip and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)
    return paths
