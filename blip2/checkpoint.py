"""Checkpoint files -> a model built on the meta device, one tensor at a time.

Each tensor is read from disk, converted to its final dtype and device, and placed; the model is
never held twice (a float32 checkpoint loaded as bfloat16 never exists in float32 in memory).
A safetensors tensor already in the dtype the model wants, for a CPU model, is not copied: the
parameter is a private (copy-on-write) memory map of its bytes, as `transformers` does: its pages are
read on first use and share the page cache instead of doubling it (a module that packs what it loads,
like quant.packed.PackedLinear, makes its own copy from the map). Tensors that are converted are read
through a private map of just their bytes, dropped once converted. This file knows no model's keys:
what a model ties, aliases or merges, it declares itself (see load_weights).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import struct
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn


class WeightsError(RuntimeError):
    """A checkpoint file is missing, truncated or does not match the model."""


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, preferring safetensors."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightsError(f"{index}: not a valid shard index ({e})") from None
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.exists():
                    raise WeightsError(f"{f}: shard listed in {index.name} is missing")
            return files
        if (directory / single).exists():
            return [directory / single]
    raise WeightsError(f"{directory}: no model.safetensors, sharded safetensors or pytorch_model.bin found")


def _safetensors_header(path: Path, f) -> tuple[dict, int]:
    size = path.stat().st_size
    raw = f.read(8)
    if len(raw) < 8:
        raise WeightsError(f"{path}: truncated safetensors file (no header)")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
        raise WeightsError(f"{path}: corrupt or truncated safetensors header")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    for key, entry in header.items():
        if not _valid_entry(entry):
            raise WeightsError(f"{path}: corrupt safetensors header entry for {key!r}: {str(entry)[:80]}")
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise WeightsError(f"{path}: truncated ({size} bytes, header says {8 + n + end})")
    return header, 8 + n


def _valid_entry(entry) -> bool:
    """Whether a safetensors header entry has a dtype name, a shape and a [start, end] byte range."""
    ints = lambda v: isinstance(v, list) and all(isinstance(x, int) and x >= 0 for x in v)  # noqa: E731
    return (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and ints(entry.get("shape"))
            and ints(entry.get("data_offsets")) and len(entry["data_offsets"]) == 2
            and entry["data_offsets"][0] <= entry["data_offsets"][1])


def _mapped(f, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """The bytes [offset, offset + nbytes) of f as a tensor over a private memory map of just that
    range: converting it reads the page cache directly, and the pages leave the process's resident
    memory once the tensor is dropped."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(f.fileno(), offset + nbytes - start, offset=start, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mm, dtype=torch.uint8, offset=offset - start, count=nbytes).view(dtype)


def _alignment(dtype: torch.dtype) -> int:
    """The address alignment a tensor of `dtype` needs to be handed out as a map of the file. Integer
    tensors are quantized weights, read by kernels that assume 64-byte rows starts (torch's AVX-512
    int8 product crashes on weights that are not 16-byte aligned); float ones need their item size."""
    return 64 if not dtype.is_floating_point else dtype.itemsize


def read_safetensors(path: Path) -> Iterator[tuple[str, tuple, Callable]]:
    """Yield (key, shape, read) for each tensor of a safetensors file; read(dtype) returns the tensor
    in that dtype (None: as stored), reading the file only then: rows=(a, b) reads those rows of the
    first dimension, out= into that tensor, and staging(shape, dtype) gives the tensor to convert into
    where the stored dtype is another (a buffer the caller reuses)."""
    with open(path, "rb") as f:
        header, base = _safetensors_header(path, f)
    for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        stored = _ST_DTYPES.get(info["dtype"])
        if stored is None:
            raise WeightsError(f"{path}: {key} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if math.prod(info["shape"]) * stored.itemsize != end - start:
            raise WeightsError(f"{path}: {key} has {end - start} bytes for shape {info['shape']}")

        def read(dtype: torch.dtype | None, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None,
                 staging: Callable | None = None, key=key, shape=info["shape"], stored=stored, start=start, end=end):
            dtype = dtype or stored
            if dtype.is_floating_point and not stored.is_floating_point:
                # Quantized weights read as floats would be garbage, not an error further on.
                raise WeightsError(f"{path}: {key} is stored as {stored}, the model expects {dtype} "
                                   "(a quantized checkpoint whose config.json lost its \"quantization\" entry?)")
            if rows is not None:  # rows [a, b) of the first dimension only
                row_bytes = (end - start) // shape[0]
                start, end, shape = start + rows[0] * row_bytes, start + rows[1] * row_bytes, [rows[1] - rows[0], *shape[1:]]
            with open(path, "rb", buffering=0) as f:
                if dtype != stored and end > start:
                    mapped = _mapped(f, base + start, end - start, stored).view(shape)
                    if out is None and staging is not None:
                        out = staging(tuple(shape), dtype)
                    return mapped.to(dtype) if out is None else out.copy_(mapped)
                if out is None and end > start and (base + start) % _alignment(stored) == 0:
                    return _mapped(f, base + start, end - start, stored).view(shape)  # no copy at all
                t = torch.empty(shape, dtype=stored) if out is None else out  # torch aligns to 64 bytes
                f.seek(base + start)
                got = f.readinto(t.view(-1).view(torch.uint8).numpy()) if t.numel() else 0
            if got != end - start:
                raise WeightsError(f"{path}: truncated while reading {key}")
            return t

        yield key, tuple(info["shape"]), read


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (readable by the `safetensors` package) whose tensors all start at
    addresses their kernels can use in place (see _alignment): the header is padded so the data
    starts on a 64-byte boundary, tensors whose size is a multiple of 64 bytes come first, the rest
    by decreasing item size. The format forbids gaps between tensors, so this order is the alignment."""
    names = {dtype: name for name, dtype in _ST_DTYPES.items()}
    order = sorted(tensors, key=lambda k: (_nbytes(tensors[k]) % 64 != 0, -tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in order:
        t = tensors[key]
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + _nbytes(t)]}
        offset += _nbytes(t)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key in order:
            if tensors[key].numel():
                f.write(tensors[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def read_bin(path: Path) -> Iterator[tuple[str, tuple, Callable]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt zip/pickle files
        raise WeightsError(f"{path}: cannot read PyTorch weights ({type(e).__name__}: {e})") from None
    for key, t in state.items():
        def read(dtype, rows=None, out=None, staging=None, t=t):
            part = t if rows is None else t[rows[0]:rows[1]]
            if out is None and staging is not None:
                out = staging(tuple(part.shape), dtype or t.dtype)
            return part.to(dtype or t.dtype, copy=True) if out is None else out.copy_(part)

        yield key, tuple(t.shape), read


class Rows:
    """A stored tensor handed over unread, for modules that convert as they load: quantized layers read
    a 2-D weight a block of rows at a time (the float32 token embedding alone is 0.5 GB, which would
    otherwise be resident whole, if only for a moment), packed ones into a buffer they reuse."""

    def __init__(self, shape: tuple, dtype: torch.dtype, device: torch.device, read: Callable):
        self.shape, self.dtype, self.device, self._read = torch.Size(shape), dtype, device, read

    def whole(self, staging: Callable[[tuple, torch.dtype], torch.Tensor] | None = None) -> torch.Tensor:
        """The whole tensor: a map of the file where it is stored in self.dtype (CPU), else converted
        into staging(shape, dtype) (a new tensor without one)."""
        if self.device.type != "cpu":
            return self._read(self.dtype).to(self.device)
        return self._read(self.dtype, staging=staging)

    def read_into(self, a: int, b: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [a, b) into `out` (contiguous, of self.dtype), which is returned."""
        if out.device.type != "cpu":
            return out.copy_(self._read(self.dtype, rows=(a, b)))
        return self._read(self.dtype, rows=(a, b), out=out)


def read_checkpoint(directory: Path) -> Iterator[tuple[str, tuple, Callable, Path]]:
    for path in checkpoint_files(directory):
        reader = read_safetensors if path.suffix == ".safetensors" else read_bin
        for key, shape, read in reader(path):
            yield key, shape, read, path


def check_ties(model: nn.Module, directory: Path) -> None:
    """Check the ties a meta-device `model` declares against what the checkpoint in `directory`
    stores, before its layers are replaced or loaded. A stored copy of a tied weight that differs
    from its source is the model's real weight (transformers 5 writes Flan-T5 so: tie_word_embeddings
    true and its own lm_head): `model.untie(name)` makes it its own. A stored alias (a key that
    names a copy of one of our parameters) that differs from it cannot be computed with: an error.
    The tensors compared are read through the page cache, where loading finds them next."""
    ties, aliases = model.tied_weights, model.checkpoint_aliases
    pairs = {**ties, **aliases}
    wanted = set(pairs) | set(pairs.values())
    stored = {key: (shape, read) for key, shape, read, _ in read_checkpoint(directory) if key in wanted}
    for copy, source in pairs.items():
        if copy not in stored or source not in stored:
            continue
        (shape, read), (source_shape, read_source) = stored[copy], stored[source]
        if shape == source_shape and torch.equal(read(None), read_source(None)):
            continue
        if copy not in ties:
            raise WeightsError(f"{directory}: {copy} differs from {source}, which it is declared a copy of "
                               "(this model has one tensor for both)")
        model.untie(copy)


@contextlib.contextmanager
def unfragmented_heap():
    """While loading, have glibc map every allocation of 128 KB or more on its own, so each temporary
    (a converted weight before packing, a block of rows being quantized) goes back to the system when
    freed instead of leaving holes in the heap between the small tensors that stay; by default the
    threshold climbs to 32 MB as large blocks are freed, and a load then ends with a gigabyte or more
    of resident but unused heap (0.4 GB of extra peak with 4 MB, measured on an int4 load).
    Afterwards the threshold is the 32 MB that glibc itself settles on, and the freed heap is returned.
    This is process-wide (glibc has one heap): the caller chooses to ask for it (load() does)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        yield
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 128 << 10)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.malloc_trim(0)


def load_weights(model: nn.Module, directory: Path, dtype_of: Callable[[str], torch.dtype], device: torch.device,
                 trainable: Callable[[str], bool] | None = None) -> None:
    """Fill every parameter of a meta-device `model` from the checkpoint in `directory`.

    dtype_of(name) gives each parameter's final dtype; trainable(name), the parameters to leave
    trainable (requires_grad, in memory of their own rather than a map of the file). What the model
    declares is read from it: `tied_weights` (param -> the param it shares when the checkpoint does
    not store it, or stores it equal: check_ties), `checkpoint_aliases` (stored key -> the param it
    is a copy of, read only when that is absent), `checkpoint_ignored` (stored keys that feed
    nothing), and modules' `checkpoint_parts` (stored pieces a module merges into its parameters).
    Modules with `load_parameter` store what they are handed their own way (packed or quantized
    weights), and `finish_loading` is called on each once every tensor is placed. Any missing,
    unexpected or misshapen key is an error.
    """
    expected = {name: p.shape for name, p in model.named_parameters()}
    ties, aliases, ignored = model.tied_weights, model.checkpoint_aliases, set(model.checkpoint_ignored)
    trainable = trainable or (lambda name: False)
    loaded: set[str] = set()
    aliased: dict[str, tuple[tuple, Callable, Path]] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unexpected: list[str] = []

    def place(name: str, shape: tuple, read: Callable, path: Path) -> None:
        if shape != tuple(expected[name]):
            raise WeightsError(f"{path}: {name} has shape {shape}, the config implies {tuple(expected[name])}")
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)  # "" is the model itself
        if attr in getattr(module, "loads_rows", ()):
            value = Rows(shape, dtype_of(name), device, read)
        else:
            value = read(dtype_of(name)).to(device)
        _set(module, attr, value, trainable(name))
        loaded.add(name)

    def other(key: str, shape: tuple, read: Callable, path: Path) -> None:
        prefix, _, attr = key.rpartition(".")
        owner = _submodule(model, prefix)
        if key in ties:
            return  # stored anyway, equal to what it is tied to (check_ties)
        if key in aliases:
            aliased.setdefault(aliases[key], (shape, read, path))  # read only if the param itself is absent
        elif attr in getattr(owner, "checkpoint_parts", ()):
            parts.setdefault(prefix, {})[attr] = read(None)
        elif key not in ignored:
            unexpected.append(f"{key} ({path.name})")

    for key, shape, read, path in read_checkpoint(directory):
        if key in expected and key not in ties:
            place(key, shape, read, path)
        else:
            other(key, shape, read, path)
    for prefix, stored in parts.items():
        owner = model.get_submodule(prefix)
        if set(stored) != set(owner.checkpoint_parts):
            unexpected.append(f"{prefix}.{'/'.join(stored)} (incomplete)")
            continue
        for attr, value in owner.merge_checkpoint_parts(stored).items():
            place(f"{prefix}.{attr}", tuple(value.shape), lambda dtype, value=value: value.to(dtype), directory)
    for name, (shape, read, path) in aliased.items():
        if name not in loaded:
            place(name, shape, read, path)
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise WeightsError(f"{directory}: unexpected keys for this config: {', '.join(unexpected[:5])}{more}")
    for module in model.modules():
        if hasattr(module, "finish_loading"):
            module.finish_loading()
    for name, source in ties.items():
        if name in expected and name not in loaded and source in loaded:
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, model.get_parameter(source))
            loaded.add(name)
    missing = [name for name in expected if name not in loaded]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(f"{directory}: missing weights: {', '.join(missing[:5])}{more}")


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _set(module: nn.Module, attr: str, value: torch.Tensor | Rows, trainable: bool) -> None:
    if hasattr(module, "load_parameter"):  # modules that store what they load differently (packed weights)
        module.load_parameter(attr, value)
    elif trainable:  # its own memory: a parameter that will be written is not a map of the file
        module._parameters[attr] = nn.Parameter(value.clone(), requires_grad=True)
    else:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
