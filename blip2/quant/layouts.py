"""The kernels' own layouts of int4 weights: torch's CPU layout (blocks of 64 or 32 rows) and CUDA's
tinygemm tiles, made from the portable form at load and read back where products widen the weight."""

from __future__ import annotations

import functools
import logging

import torch

from .formats import _ROWS, _nibbles, _pack_nibbles, _unpack_nibbles

log = logging.getLogger(__name__)


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


