"""Weight-only int8 and int4 linear layers on torch's own kernels, quantized while loading.

int8: symmetric, one scale per output channel, w ~ q * s with q in [-127, 127]
      (aten._weight_int8pack_mm on CPU; dequantize-then-matmul elsewhere).
int4: asymmetric, one scale and zero per group of `group_size` inputs, w ~ (q - 8) * s + z with q in
      [0, 15] (the "tinygemm" convention: aten._weight_int4pack_mm_for_cpu, aten._weight_int4pack_mm on CUDA).
On AVX2 CPUs, blip2's own products (cpu_kernels.py) replace torch's CPU kernels, which are written for
AVX-512; many rows (image batches) widen the weight and use the float GEMM.

Quantized: every Linear inside a transformer layer of the language model (OPT q/k/v/out_proj, fc1,
fc2; T5 q/k/v/o, wi/wi_0/wi_1, wo), its output head, and, unless `vision=False`, the image side: the
vision encoder's layers (qkv, projection, fc1, fc2) and the Q-Former's. The token embedding, the
output head and the Q-Former are int8 in both modes (one scale per row; a head tied to the embedding
reads the same int8 rows, each row's scale being that output's scale; see layer_quantization). Norms,
biases, position tables, query tokens and the language projection keep the float dtype. A quantized
checkpoint's layers are read in the mode they were stored in (stored_layer_modes).

A quantized checkpoint stores a portable form, the same on every device; the kernels' packed layout
(which differs between CPU and CUDA) is made at load:
    int8: <layer>.weight int8 [N, K], <layer>.scales float32 [N]
    int4: <layer>.weight uint8 [N, K/2] (column 2j in the low nibble, 2j+1 in the high one),
          <layer>.scales and <layer>.zeros float32 [N, K/group_size]
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .weights import Rows, read_checkpoint

log = logging.getLogger(__name__)

MODES = ("int8", "int4")
# 128 keeps int4 scales at 0.25 bit per weight; see README "Precision and quantization" for the measured
# quality and speed of 32, 64 and 128.
GROUP_SIZE = 128
_ROWS = 1024  # quantize and pack this many output rows at a time, so temporaries stay small


@dataclass(frozen=True)
class Quantization:
    """What is quantized and how: recorded as the "quantization" entry of a quantized checkpoint's config.json."""

    mode: str
    group_size: int = GROUP_SIZE  # int4 only
    vision: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unsupported quantization {self.mode!r} (use {' or '.join(MODES)})")
        # int8 ignores group_size, but one that is not an integer is a mistake in either mode.
        is_int = isinstance(self.group_size, int) and not isinstance(self.group_size, bool)
        if not is_int or (self.mode == "int4" and self.group_size not in (32, 64, 128, 256)):
            raise ValueError(f"group_size={self.group_size!r} must be 32, 64, 128 or 256 (inputs per int4 scale)")
        if not isinstance(self.vision, bool):
            raise ValueError(f"vision={self.vision!r} must be True or False")

    def to_json(self) -> dict:
        out = asdict(self)
        if self.mode == "int8":
            out.pop("group_size")
        return out

    @classmethod
    def from_json(cls, raw: dict) -> "Quantization":
        """Read config.json's "quantization" entry, as written by to_json; an error names the entry."""
        try:
            if not isinstance(raw, dict) or "mode" not in raw:
                raise ValueError('expected an object with a "mode"')
            return cls(raw["mode"], raw.get("group_size", GROUP_SIZE), raw.get("vision", True))
        except ValueError as e:
            raise ValueError(f'config.json: malformed "quantization" entry {raw!r}: {e}') from None


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


def unfit(in_features: int, out_features: int, q: Quantization) -> str | None:
    """Why the kernels cannot take this Linear (None when they can). Checked the same way on every
    device, so a quantized checkpoint loads anywhere."""
    if q.mode == "int8" and in_features % 16:
        return f"int8 needs in_features divisible by 16, got {in_features}"  # the CPU kernel reads 16 at a time
    if q.mode == "int4" and in_features % q.group_size:
        return f"int4 needs in_features divisible by the group size {q.group_size}, got {in_features}"
    if q.mode == "int4" and out_features % 16:
        return f"int4 needs out_features divisible by 16, got {out_features}"
    return None


EMBEDDINGS = ("language_model.model.decoder.embed_tokens", "language_model.shared")
HEAD = "language_model.lm_head"


def layer_quantization(name: str, q: Quantization) -> Quantization:
    """How the layer `name` is quantized under `q`: the token embedding, the output head and the
    Q-Former are always int8. The head's error goes straight into the logits (an int4 OPT embedding,
    tied to the head, would save 61 MB but take the test checkpoint's int4 logits error from 8.0% to
    12.7%; an int8 Flan-T5 head takes it from 18.8% to 15.9%, for 31 MB). The Q-Former's 32 queries
    are all the language model sees of the image: on full-size random opt-2.7b weights an int4
    Q-Former alone moves the logits by 16.0%, an int8 one by 1.4%, for 49 MB."""
    if name in EMBEDDINGS or name == HEAD or name.startswith("qformer."):
        return Quantization("int8", vision=q.vision)
    return q


def target_names(model: nn.Module, q: Quantization) -> list[str]:
    """Names of the Linear (and token Embedding) modules of `model` (a Blip2Model) that `q` quantizes,
    unfit ones excluded. A head tied to the embedding is not listed: it is the embedding."""
    prefixes = ["language_model.model.decoder.layers.", "language_model.encoder.block.",
                "language_model.decoder.block."]
    if q.vision:
        prefixes += ["vision_model.encoder.layers.", "qformer.encoder.layer."]
    tied = model.config.text.tie_word_embeddings
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name in EMBEDDINGS:
            out_features, in_features = module.weight.shape
        elif isinstance(module, nn.Linear) and (name.startswith(tuple(prefixes))
                                                or name == HEAD and not tied):
            out_features, in_features = module.out_features, module.in_features
        else:
            continue
        reason = unfit(in_features, out_features, layer_quantization(name, q))
        if reason:
            log.debug("%s stays unquantized: %s", name, reason)
        else:
            names.append(name)
    return names


# ---------------------------------------------------------------------------------------------------
# Quantize and dequantize (the portable form)


def quantize_weight(w: torch.Tensor | Rows, q: Quantization) -> dict[str, torch.Tensor]:
    """A float weight [N, K] (or its rows as the loader reads them) to its portable quantized form (see
    the module docstring); scales in float32. Works on _ROWS rows at a time in reused buffers: fresh
    blocks of tens of MB cost more in page faults than the arithmetic."""
    w = w.detach() if isinstance(w, torch.Tensor) else w
    n, k = w.shape
    block = _reused(_LOAD_BUFFERS, ("rows", w.device), (min(_ROWS, n), k), torch.float32, w.device)

    def rows_at(r: int) -> torch.Tensor:  # a float32 copy of rows [r, r + _ROWS), ours to overwrite
        m = min(_ROWS, n - r)
        return w.read_into(r, r + m, block[:m]) if isinstance(w, Rows) else block[:m].copy_(w[r:r + m])

    if q.mode == "int8":
        qw = torch.empty(n, k, dtype=torch.int8, device=w.device)
        scales = torch.empty(n, dtype=torch.float32, device=w.device)
        for r in range(0, n, _ROWS):
            rows = rows_at(r)
            s = torch.maximum(-rows.amin(1), rows.amax(1)).clamp_(min=1e-12) / 127  # (aminmax is 5x slower)
            qw[r:r + len(rows)] = rows.div_(s[:, None]).round_().clamp_(-127, 127)
            scales[r:r + len(rows)] = s
        return {"weight": qw, "scales": scales}
    g = q.group_size
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, k // g, dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    codes = _reused(_LOAD_BUFFERS, ("codes", w.device), (min(_ROWS, n), k), torch.uint8, w.device)
    for r in range(0, n, _ROWS):
        rows = rows_at(r)
        m = len(rows)
        grouped = rows.view(m, k // g, g)
        lo, hi = grouped.amin(-1), grouped.amax(-1)
        s = (hi - lo).clamp(min=1e-6) / 15
        c = codes[:m].copy_(grouped.sub_(lo[..., None]).div_(s[..., None]).round_().clamp_(0, 15).view(m, k))
        torch.bitwise_or(c[:, 0::2], c[:, 1::2].bitwise_left_shift_(4), out=packed[r:r + m])
        scales[r:r + m] = s
        zeros[r:r + m] = lo + 8 * s
    return {"weight": packed, "scales": scales, "zeros": zeros}


def _reused(store: dict, key: object, shape: tuple[int, int], dtype: torch.dtype,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """A buffer of `shape` kept in `store` under `key`, grown as needed: fresh blocks of tens of MB
    cost more (in page faults) than the work done in them."""
    n = shape[0] * shape[1]
    buf = store.get(key)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # an ordinary tensor: usable inside and outside inference mode
            buf = store[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


_LOAD_BUFFERS: dict[tuple, torch.Tensor] = {}  # reused while loading, released by release_load_buffers


def release_load_buffers() -> None:
    _LOAD_BUFFERS.clear()


def dequantize_weight(parts: dict[str, torch.Tensor], q: Quantization) -> torch.Tensor:
    """The float32 weight [N, K] a portable quantized form stands for."""
    if q.mode == "int8":
        return parts["weight"].float() * parts["scales"].float()[:, None]
    codes = _unpack_nibbles(parts["weight"]).float()
    n, k = codes.shape
    s, z = parts["scales"].float(), parts["zeros"].float()
    return ((codes.view(n, -1, q.group_size) - 8) * s[..., None] + z[..., None]).view(n, k)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 15] -> the portable form, uint8 [N, K/2] (column 2j in the low nibble)."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Portable uint8 [N, K/2] -> int32 codes [N, K]."""
    return _nibbles(packed).view(packed.shape[0], -1).to(torch.int32)


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


def _pack_cuda_int4(packed: torch.Tensor) -> torch.Tensor:
    """Portable nibbles to the CUDA int4 kernel's layout (torch's op takes uint8 [N, K/2] with the even
    column in the high nibble)."""
    swapped = (packed << 4) | (packed >> 4)
    return torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), _inner_k_tiles(packed.shape[1] * 2))


def _pack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Portable nibbles to the int4 kernel's layout on their device."""
    if packed.device.type == "cuda":
        return _pack_cuda_int4(packed)
    # The layout is independent across blocks of rows and the last rows: large weights are packed in
    # slices of multiples of 64 rows (whole blocks in either layout), to keep temporaries small.
    block = cpu_int4_block()
    n = packed.shape[0]
    full = n // 64 * 64
    bounds = [*range(0, full, _ROWS), full] + ([n] if n > full else [])
    out = torch.empty_like(packed)
    for a, b in zip(bounds, bounds[1:]):  # bounds rise strictly: no empty slice
        if block:
            out[a:b] = _cpu_int4_layout(packed[a:b], block)
        else:  # torch's op: the same bytes, 4x slower (it takes int32 codes)
            out[a:b] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_unpack_nibbles(packed[a:b]), 1)
    return out


# torch's CPU int4 kernel lays a weight [N, K] out as uint8 [N, K/2]: blocks of B rows (B = 64 with
# AVX-512, 32 with AVX2: the rows its vector registers hold) stored as [K, B/2] bytes, row d of a block
# in the low nibble of byte d and row B/2 + d in the high one; then the last N % B rows as
# [K, (N % B) / 2] bytes, row 2i in the low nibble of byte i and row 2i + 1 in the high one. This is
# what aten._convert_weight_to_int4pack_for_cpu makes from int32 codes; cpu_int4_block checks it.


def _cpu_int4_layout(portable: torch.Tensor, block: int) -> torch.Tensor:
    """Portable nibbles (uint8 [N, K/2], column 2j in the low nibble, 2j + 1 in the high one) to the
    CPU int4 kernel's layout with `block` rows a block (see above)."""
    n, half = portable.shape
    full = n // block * block
    out = torch.empty_like(portable)

    def interleave(lo_rows: torch.Tensor, hi_rows: torch.Tensor, even: torch.Tensor, odd: torch.Tensor) -> None:
        # even columns 2j: both rows' low nibbles; odd columns 2j + 1: both rows' high nibbles
        even.copy_(((lo_rows & 15) | (hi_rows << 4)).transpose(-1, -2))
        odd.copy_(((lo_rows >> 4) | (hi_rows & 0xF0)).transpose(-1, -2))

    if full:
        blocks = portable[:full].view(full // block, 2, block // 2, half)  # rows d and B/2 + d of each block
        o = out[:full].view(full // block, half, 2, block // 2)
        interleave(blocks[:, 0], blocks[:, 1], o[:, :, 0], o[:, :, 1])
    if n > full:
        pairs = portable[full:].view((n - full) // 2, 2, half)  # rows 2i and 2i + 1
        o = out[full:].view(half, 2, (n - full) // 2)
        interleave(pairs[:, 0], pairs[:, 1], o[:, 0], o[:, 1])
    return out


@functools.cache
def cpu_int4_block() -> int | None:
    """The block of rows this torch's CPU int4 layout uses (64 or 32), or None if it is neither
    layout _cpu_int4_layout writes and _dequantize_cpu_int4_t reads (checked once on a small weight
    with a tail; if a torch release changes it, packing falls back to torch's op and int4 products to
    its kernel)."""
    portable = torch.randint(0, 256, (96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    try:
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_unpack_nibbles(portable), 1)
    except (RuntimeError, AttributeError):
        return None
    for block in (64, 32):
        if theirs.dtype == torch.uint8 and torch.equal(theirs, _cpu_int4_layout(portable, block)):
            return block
    log.warning("this torch's CPU int4 layout is not one blip2 knows: packing through torch's op and "
                "int4 products through its kernel (same results; loading, prompts and image encoding slower)")
    return None


def _dequantize_cpu_int4_t(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                           out: torch.Tensor) -> torch.Tensor:
    """Rows of a weight in the CPU int4 kernel's layout (a multiple of its block), transposed, into
    `out` [K, R]: (q - 8) * s + z as the kernel computes it, rounded to out's dtype. Their scales and
    zeros are [K/G, R, 2]. Transposed, each group's scale multiplies a contiguous run of R values,
    which vectorises (3x faster than dequantizing rows)."""
    k, r = out.shape
    block = cpu_int4_block()
    blocks = packed.view(r // block, k, block // 2)
    out.view(k, r // block, 2, block // 2).copy_(torch.stack([blocks & 15, blocks >> 4], 2).transpose(0, 1))
    w = out.view(k // group_size, group_size, r).sub_(8)
    sz = scales_and_zeros.to(out.dtype)
    return torch.addcmul(sz[..., 1].contiguous()[:, None], w, sz[..., 0].contiguous()[:, None], out=w).view(k, r)


# torch's CUDA int4 kernel (tinygemm) lays a weight [N, K] out as int32 [N/8, K/(16t), 32, t/2]
# (t = _inner_k_tiles(K)): tiles of 8 rows x 16t columns in row-major order, each tile's 128t nibbles
# in the order the tensor cores' fragments read them. That order is read off torch's own packing op
# once per K (_band_index) and checked on a weight of 16 x K, so that products of many rows can widen
# the weight from the one copy the layer holds (the kernel is built for a few rows: 18x slower than
# float16 at 256, BENCHMARKS.md GPU runs 5 and 9).


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit value of a packed tensor in memory order (byte by byte, the low nibble first: for
    int32 words on a little-endian machine, the word's bits 0-3, 4-7, ...)."""
    b = packed.contiguous().view(torch.uint8)
    return torch.stack([b & 15, b >> 4], -1).view(-1)


def _band_index(k: int, pack, device) -> torch.Tensor | None:
    """For the layout `pack` makes of weights with k inputs: where each element of a band of 8 rows
    (8 x k, row-major) lies among the band's packed nibbles. The order within a tile (8 x 16t) is found
    by packing three probes whose codes spell each element's index 4 bits at a time; None if the
    packing is not tiled so (checked on a weight of 16 x k)."""
    cols = 16 * _inner_k_tiles(k)
    index = torch.arange(8 * cols, device=device)
    found = torch.zeros_like(index)
    for shift in (0, 4, 8):  # 8 * 16t <= 1024 elements: three nibbles name each
        codes = ((index >> shift) & 15).to(torch.uint8).view(8, cols)
        found |= _nibbles(pack(_pack_nibbles(codes))).long() << shift
    if not torch.equal(found.sort().values, index):
        return None
    order = torch.empty_like(found)
    order[found] = index  # found[slot] = element  ->  order[element] = slot
    # Where each element of a band of 8 rows (row-major, 8 x k) lies among the band's nibbles
    tiles = torch.arange(k // cols, device=device)[None, :, None] * (8 * cols)
    band = (tiles + order.view(8, 1, cols)).reshape(-1)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (16, k), dtype=torch.uint8, generator=g).to(device)
    unpacked = _unpack_tiles(pack(_pack_nibbles(codes)), band, 16, k)
    return band if torch.equal(unpacked, codes) else None


def _unpack_tiles(packed: torch.Tensor, band: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A tiled int4 weight (see above) back to its codes, uint8 [N, K]: each band of 8 rows gathered
    from its nibbles in one pass (`band` from _band_index)."""
    return _nibbles(packed).view(n // 8, 8 * k).index_select(1, band).view(n, k)


@functools.cache
def cuda_int4_band(k: int, device: str) -> torch.Tensor | None:
    """_band_index for torch's CUDA int4 layout (None, with a warning, if it is not tiled as known:
    products then stay on torch's kernel at every size)."""
    band = _band_index(k, _pack_cuda_int4, torch.device(device))
    if band is None:
        log.warning("this torch's CUDA int4 layout is not one blip2 knows: int4 products of many rows "
                    "stay on torch's kernel (same results, slower)")
    return band


def _dequantize_cuda_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, n: int, k: int,
                          band: torch.Tensor) -> torch.Tensor:
    """A weight in the CUDA int4 layout widened to bfloat16 [N, K]: (q - 8) * s + z, as the kernel
    computes it, in one pass over the codes: q * s + (z - 8s) in float32 (q * s and z - 8s are exact
    there) rounded once to bfloat16."""
    codes = _unpack_tiles(packed, band, n, k).view(n, k // group_size, group_size)
    sz = scales_and_zeros.float()  # [K/G, N, 2]
    scales, zeros = sz[..., 0].t()[..., None], (sz[..., 1] - 8 * sz[..., 0]).t()[..., None]
    w = torch.empty(n, k // group_size, group_size, dtype=torch.bfloat16, device=packed.device)
    return torch.addcmul(zeros, codes, scales, out=w).view(n, k)


# ---------------------------------------------------------------------------------------------------
# The layer


# From this many rows on, CPU products widen the weight and run the float GEMM (see
# QuantizedLinear.forward): the kernels' cost grows with the rows, widening's with the weight (int4's
# dequantization costs about what torch's kernel does on 64-128 rows, measured on 2 cores). blip2's
# own AVX2 products (cpu_kernels.py) keep up with the GEMM until about 256 rows for both (OPT-2.7b's
# layers, float32, `python scripts/quantization.py products`: int8 260 against 322 ms at 256 rows,
# 632 against 461 at 512; int4 263 against 256 at 256).
_GEMM_ROWS = {"int8": 32, "int4": 128}
_OWN_GEMM_ROWS = 256
# From this many rows on, CUDA int4 products widen the weight to bfloat16 and use the GEMM
# (`python scripts/gpu_ab.py --only int4` times both on opt-2.7b's layers).
CUDA_INT4_GEMM_ROWS = 256
# Weight elements widened at a time. int8: 64 MB in bfloat16, the largest OPT-2.7b layer (fc1, 26 M)
# at once, the head in 4 parts. int4: 2 M, so the dequantization's temporaries stay small (at 257
# rows 2.5-3x faster than the kernel on the vision encoder's layers, measured).
_WIDEN_ELEMENTS = {"int8": 1 << 25, "int4": 1 << 21}
_SCRATCH: dict[torch.dtype, torch.Tensor] = {}  # the widened weight, per dtype (kept: reused by every product)


class QuantizedLinear(nn.Module):
    """A Linear with int8 or int4 weights, computing in a float dtype (`dtype`: the activations').

    Built on the meta device before loading. Its parameters say what the checkpoint holds: a float
    `weight` [N, K] (quantized the moment the loader hands it over, so the float model never exists),
    or the portable quantized form written by `blip2 quantize` (`prequantized`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, q: Quantization, dtype: torch.dtype,
                 prequantized: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.q, self.dtype = in_features, out_features, q, dtype
        n, k = out_features, in_features
        if not prequantized:
            self.weight = nn.Parameter(torch.empty(n, k, dtype=torch.float32), requires_grad=False)
        elif q.mode == "int8":
            self.weight = nn.Parameter(torch.empty(n, k, dtype=torch.int8), requires_grad=False)
            self.scales = nn.Parameter(torch.empty(n, dtype=torch.float32), requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.empty(n, k // 2, dtype=torch.uint8), requires_grad=False)
            self.scales = nn.Parameter(torch.empty(n, k // q.group_size, dtype=torch.float32), requires_grad=False)
            self.zeros = nn.Parameter(torch.empty(n, k // q.group_size, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(n, dtype=dtype), requires_grad=False) if bias else None
        self.loads_rows = () if prequantized else ("weight",)  # the loader hands the float weight over as Rows
        self._parts: dict[str, torch.Tensor] = {}

    def load_parameter(self, name: str, value: torch.Tensor) -> None:
        """Called by the loader with each tensor as it is read."""
        if name == "bias":
            self.bias = nn.Parameter(value.to(self.dtype), requires_grad=False)
            return
        quantize = name == "weight" and (isinstance(value, Rows) or value.is_floating_point())
        parts = quantize_weight(value, self.q) if quantize else {name: value}
        if self.q.mode == "int4" and "weight" in parts:
            # Packed at once: in a saved checkpoint a layer's codes and scales may lie far apart (safetensors
            # orders tensors by dtype), and holding every layer's unpacked codes meanwhile costs memory.
            parts["weight"] = _pack_int4(parts["weight"])
        self._parts.update(parts)
        if len(self._parts) == (2 if self.q.mode == "int8" else 3):
            self._finish(self._parts)
            self._parts = {}

    def finish_loading(self) -> None:
        """Called by the loader once every tensor is placed."""
        release_load_buffers()

    def _finish(self, parts: dict[str, torch.Tensor]) -> None:
        for name in ("weight", "scales", "zeros"):
            self._parameters.pop(name, None)
        cpu = parts["weight"].device.type == "cpu"
        # The kernels' activation dtype. CUDA tinygemm takes bfloat16 only; torch's CPU kernels are
        # vectorised for half precision on AVX2 too but multiply float32 one scalar at a time (10-30x
        # slower), so a float32 model hands them its activations rounded to bfloat16 (products still
        # sum in float32): README "Precision and quantization" has the measured cost in quality.
        self.kernel_dtype = torch.bfloat16 if (self.q.mode == "int4" and not cpu) or (
            cpu and self.dtype == torch.float32) else self.dtype
        if self.q.mode == "int8":
            self.register_buffer("weight", parts["weight"].contiguous())
            self.register_buffer("scales", parts["scales"].to(self.dtype))
            self.register_buffer("kernel_scales", self.scales.to(self.kernel_dtype))
        else:
            self.register_buffer("weight", parts["weight"])
            sz = torch.stack([parts["scales"], parts["zeros"]], -1).transpose(0, 1)  # [K/G, N, 2]
            self.register_buffer("scales_and_zeros", sz.to(self.kernel_dtype).contiguous())
        # blip2's own products up to _OWN_GEMM_ROWS rows on AVX2 machines (cpu_kernels.py): the scales as the
        # layer keeps them (int8: its dtype's; int4: bfloat16, torch's layout in blocks of 32 rows)
        self.own_product = cpu and cpu_kernels.preferred() and (
            self.scales.dtype in (torch.float32, torch.bfloat16) if self.q.mode == "int8" else
            cpu_int4_block() == cpu_kernels.BLOCK and self.out_features % cpu_kernels.BLOCK == 0
            and self.scales_and_zeros.dtype == torch.bfloat16)
        # From this many rows on a CPU product widens the weight through the float GEMM (None: never;
        # int4 needs a layout _dequantize_cpu_int4_t reads, in whole blocks)
        block = cpu_int4_block()
        self.widen_from = (_OWN_GEMM_ROWS if self.own_product else _GEMM_ROWS[self.q.mode]) if cpu and (
            self.q.mode == "int8" or block and self.out_features % block == 0) else None
        # CUDA int4: where many-row products find each code in the kernel's layout (found here, at
        # load, never while a CUDA graph is being captured)
        self.cuda_band = cuda_int4_band(self.in_features, str(parts["weight"].device)) if (
            self.q.mode == "int4" and parts["weight"].device.type == "cuda") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).to(self.dtype)
        cpu = x.device.type == "cpu"
        if cpu and self.widen_from is not None and x.shape[0] >= self.widen_from:
            # The CPU kernels work row by row: for many rows (image patches; with torch's kernels, a
            # prompt too) the weight widened to the activations' dtype through the float GEMM is faster
            # (than torch's kernels: int8 up to 6x, int4 on the vision encoder 2.5x).
            y = self._widened_linear(x)
        elif self.cuda_band is not None and x.shape[0] >= CUDA_INT4_GEMM_ROWS:
            # CUDA int4, many rows (image patches, prompts, large batches): tinygemm works a few rows
            # at a time; the weight widened to bfloat16 through the GEMM is faster from here on.
            w = _dequantize_cuda_int4(self.weight, self.scales_and_zeros, self.q.group_size, self.out_features,
                                      self.in_features, self.cuda_band)
            y = F.linear(x.to(torch.bfloat16), w).to(self.dtype)
        elif self.q.mode == "int8" and not (cpu or x.device.type == "mps"):
            # CUDA: the weight widened (int8 values are exact in half precision) and the scales applied
            # to the float32 output, as the CPU kernel does: 1.7x faster than scaling the widened weight
            # first (BENCHMARKS.md, GPU run 5). Integer-valued products may pass float16's range before
            # scaling, hence the float32 output.
            w = self.weight.to(self.dtype).t()
            y = torch.mm(x, w, out_dtype=torch.float32) if self.dtype != torch.float32 else torch.mm(x, w)
            y = (y * self.scales).to(self.dtype)
        elif cpu and self.own_product:  # activations in float32 (int8) or 16-bit steps (int4), not bfloat16
            y = (cpu_kernels.int8_mm(x, self.weight, self.scales) if self.q.mode == "int8" else
                 cpu_kernels.int4_mm(x, self.weight, self.scales_and_zeros, self.q.group_size)).to(self.dtype)
        else:
            xk = x.to(self.kernel_dtype).contiguous()
            if self.q.mode == "int8":
                y = torch.ops.aten._weight_int8pack_mm(xk, self.weight, self.kernel_scales)
            elif cpu:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, self.weight, self.q.group_size, self.scales_and_zeros)
            else:
                y = torch.ops.aten._weight_int4pack_mm(xk, self.weight, self.q.group_size, self.scales_and_zeros)
            y = y.to(self.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def _widened_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The weight widened to the activations' dtype, _WIDEN_ELEMENTS at a time, through F.linear.
        int8 values are exact in bfloat16 and their scales apply to the output, as in the kernel; int4
        weights are dequantized as the kernel does and rounded to the dtype."""
        rows = max(64, _WIDEN_ELEMENTS[self.q.mode] // self.in_features // 64 * 64)
        out = torch.empty(x.shape[0], self.out_features, dtype=self.dtype, device=x.device)
        for r in range(0, self.out_features, rows):
            n = min(rows, self.out_features - r)
            if self.q.mode == "int8":
                w = _reused(_SCRATCH, self.dtype, (n, self.in_features), self.dtype).copy_(self.weight[r:r + n])
                torch.mul(F.linear(x, w), self.scales[r:r + n], out=out[:, r:r + n])
            else:
                w_t = _reused(_SCRATCH, self.dtype, (self.in_features, n), self.dtype)
                _dequantize_cpu_int4_t(self.weight[r:r + n], self.scales_and_zeros[:, r:r + n], self.q.group_size, w_t)
                torch.matmul(x, w_t, out=out[:, r:r + n])
        return out

    def extra_repr(self) -> str:
        g = f", group_size={self.q.group_size}" if self.q.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.q.mode}{g}, dtype={self.dtype}"


class QuantizedEmbedding(QuantizedLinear):
    """A token embedding [vocab, dim] in int8 (one scale per row). Called with token ids it looks rows
    up; called with hidden states it is the output head tied to the embedding (logits = x @ W.T, row
    scales applied to the outputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return super().forward(x)
        return self.weight[x].to(self.dtype) * self.scales[x].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.out_features}, embedding_dim={self.in_features}, int8, dtype={self.dtype}"


def quantize_linears(model: nn.Module, q: Quantization, dtype_of, stored: dict[str, str] | None = None) -> list[str]:
    """Replace, on a meta-device Blip2Model before loading, the layers `q` targets by QuantizedLinear
    (QuantizedEmbedding for the token embedding, which a tied head then shares), computing in
    dtype_of(<layer>.weight). Returns their names. stored: a quantized checkpoint's layer modes
    (stored_layer_modes), which the layers are then read in, as written."""
    names = [name for name in target_names(model, q) if stored is None or name in stored]
    prequantized = stored is not None

    def layer_q(name: str) -> Quantization:
        return layer_quantization(name, q) if stored is None else replace(q, mode=stored[name])

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        dtype = dtype_of(f"{name}.weight")
        if isinstance(old, nn.Embedding):
            vocab, dim = old.weight.shape
            new = QuantizedEmbedding(dim, vocab, False, layer_q(name), dtype, prequantized)
            if model.config.text.tie_word_embeddings:
                model.language_model.lm_head = new
        else:
            new = QuantizedLinear(old.in_features, old.out_features, old.bias is not None, layer_q(name), dtype,
                                  prequantized)
        setattr(parent, child, new)
    return names


# ---------------------------------------------------------------------------------------------------
# Quantized checkpoints


_SHARD_BYTES = 2 * 10**9


def write_quantized(src: Path, dst: Path, q: Quantization, calibration: Sequence = (),
                    device: str = "cpu") -> list[Path]:
    """Write the checkpoint in `src` to the new directory `dst` with the target Linear weights in
    portable quantized form, one tensor at a time, in safetensors shards of at most 2 GB (other tensors
    as stored); config.json gains a "quantization" entry; the tokenizer and processor files are
    copied. Returns the shard paths.

    calibration: images (anything `load_image` takes); when given, the layers are quantized by GPTQ
    on them (gptq.py, run on `device`), otherwise rounded to nearest."""
    from .config import Blip2Config
    from .model import Blip2Model
    from .weights import checkpoint_files, read_checkpoint, resolve_ties, write_safetensors

    src, dst = Path(src), Path(dst)
    if stored_quantization(src) is not None:
        raise ValueError(f"{src} is already quantized")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")
    cfg = Blip2Config.from_file(src)
    resolve_ties(src, cfg)
    with torch.device("meta"):
        targets = target_names(Blip2Model(cfg), q)
    calibrated = {}
    if calibration:
        from .gptq import calibrated_parts

        calibrated = calibrated_parts(src, q, calibration, targets, device)
    targets = set(targets)
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
        if key.endswith(".weight") and module in targets:
            parts = calibrated.pop(module, None) or quantize_weight(
                Rows(shape, torch.float32, torch.device("cpu"), read), layer_quantization(module, q))
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
    release_load_buffers()
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
