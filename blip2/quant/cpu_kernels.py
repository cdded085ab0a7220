"""blip2's own CPU products: int8 weights on a layout of their own (pairs of inputs for 16 outputs)
for every row count on AVX2 machines and on AVX512-BF16 ones without AMX, int4 weights for up to
256 rows and float32 weights on AVX2 machines, dynamic int8 activations on int8 vector units, and
bfloat16 on AVX512-BF16.

torch's CPU weight-only kernels (aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu) are
vectorised for AVX-512; on an AVX2-only CPU they read a decoded token's weights well below the
memory's speed (int4 took as long as int8; docs/log.md). int8 layers hold their codes in
pair_layout; both int8 products take each activation row in 16-bit steps of its largest value and
multiply codes and activations as integers (2e-5 off the exact product of the quantized weight;
torch's kernels take the activations rounded to bfloat16). int4 reads the tensors the layer holds:
torch's AVX2 layout (quantize._cpu_int4_layout with blocks of 32 rows) and its [K/G, N, 2] bfloat16
scales and zeros, and computes, per group of G inputs,

    y[m, n] += s[n, g] * dx[m, g] * sum_k q[n, k] xq[m, k] + (z[n, g] - 8 s[n, g]) * sum_k x[m, k]

which is sum_k ((q - 8) s + z) x but for xq = round(x / dx), the activations in 16-bit steps of
each group's largest (dx = max |x| / 32767): codes and activations then multiply as integers, two
columns per instruction, and each group's sum is scaled once. Against the exact product of the
quantized weight that is 3e-5 to 1.4e-4 off, torch's bfloat16 activations 2.3e-3 (a group whose
largest value is 100x the others', as outlier features make them, still rounds those others by
about 1e-3 at most, bfloat16's own step).

They are C++ with AVX2 intrinsics (csrc/products_avx2.cpp) or AVX-512 ones (csrc/products_avx512.cpp),
compiled on first use (blip2.native). Where there is no compiler or no AVX2, `library()` is None and
the layers use torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from ..native import PAIR_FLAGS, cpu_flags, load, pair_units

BLOCK = 32  # rows per block of torch's AVX2 int4 layout, the only one int4_mm reads
CHUNK = 2  # activation rows multiplied per pass over the weights (registers: 4 accumulators a row)

SOURCE = Path(__file__).with_name("csrc") / "products_avx2.cpp"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", f"-DCHUNK={CHUNK}")
_INT = ctypes.c_int64
# blip2_int8_pairs_mm's arguments, the same in both libraries (x, x_bf16, m, k, k_even, w, scales,
# bias, bias_bf16, n, y, y_bf16, scratch, threads)
INT8_PAIRS_ARGS = [ctypes.c_void_p, ctypes.c_int, _INT, _INT, _INT, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int, _INT, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
log = logging.getLogger(__name__)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled products, or None where they cannot run (no AVX2, or no compiler: then a warning
    says so once and torch's kernels serve)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    ptr = ctypes.c_void_p
    lib = load(SOURCE, FLAGS, {"blip2_int4_mm": [ptr, _INT, _INT, ptr, ptr, _INT, _INT, ptr, ctypes.c_int],
                               "blip2_int8_pairs_mm": INT8_PAIRS_ARGS,
                               "blip2_f32_mm": [ptr, _INT, _INT, ptr, ptr, _INT, ptr, ctypes.c_int]},
               "int8/int4 products use torch's CPU kernels (slower on an AVX2 machine)")
    if lib is not None:
        lib.blip2_int4_mm.restype = ctypes.c_int  # nonzero: out of memory
    return lib


def preferred() -> bool:
    """Whether decoding steps use these products: on AVX2 machines, where they are built. (On AVX-512
    ones torch's kernels are vectorised, and torch lays int4 weights in blocks of 64 rows.)"""
    return torch.backends.cpu.get_cpu_capability() == "AVX2" and library() is not None


def int4_mm(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] times an int4 weight in torch's AVX2 CPU layout (uint8 [N, K/2]; scales_and_zeros
    bfloat16 [K/G, N, 2]), in float32: [M, N]."""
    x = x.float().contiguous()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if m and library().blip2_int4_mm(x.data_ptr(), m, k, weight.data_ptr(), scales_and_zeros.data_ptr(), n, group_size,
                               y.data_ptr(), torch.get_num_threads()):
        raise MemoryError("blip2_int4_mm: out of memory")
    return y


def f32_layout(weight: torch.Tensor) -> torch.Tensor:
    """A weight [N, K] in float32 as f32_mm reads it: [ceil(N/16), K, 16], padded with zeros."""
    n, k = weight.shape
    weight = weight.float()
    padded = torch.nn.functional.pad(weight, (0, 0, 0, -n % 16)) if n % 16 else weight  # no copy where whole
    return padded.view(-1, 16, k).transpose(1, 2).contiguous()


def f32_rows(weight: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Rows `ids` of a [N, k] table held in f32_layout (token embeddings): [*ids.shape, k]."""
    return weight[ids // 16, :, ids % 16]  # row r is column r % 16 of block r // 16


def f32_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """x [..., K] (float32) times a weight in f32_layout with N outputs, plus a float32 bias: [..., N]."""
    x = x.float().contiguous()
    k = x.shape[-1]
    m = x.numel() // k
    y = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    if m:
        library().blip2_f32_mm(x.data_ptr(), m, k, weight.data_ptr(), None if bias is None else bias.data_ptr(), n,
                               y.data_ptr(), torch.get_num_threads())
    return y


# Dynamic int8 activations (csrc/dynamic_int8.cpp): where the CPU multiplies int8 in its vector units
# (AVX-512 VNNI, AMX), an int8 layer's many-row products (image patches, prompts) quantize each row of
# activations by its largest magnitude and multiply integers (torch._int_mm): 1.4-2x faster than the
# weight widened to bfloat16 on the vision encoder's shapes, including both passes (docs/log.md).
DYNAMIC_SOURCE = Path(__file__).with_name("csrc") / "dynamic_int8.cpp"
DYNAMIC_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fno-math-errno", "-fopenmp", "-shared",
                 "-fPIC")


def int8_units() -> bool:
    """Whether this CPU multiplies int8 vectors natively (AVX-512 VNNI or AMX) and torch uses AVX-512."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    return bool(cpu_flags() & {"avx512_vnni", "amx_int8"})


def exact_int_mm() -> bool:
    """Whether torch._int_mm sums int8 products exactly here. Where oneDNN multiplies int8 without
    VNNI (held to AVX2 by ONEDNN_MAX_CPU_ISA, for one) it adds pairs of products in saturating 16-bit
    lanes, and most sums of full-range values come out wrong."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (32, 64), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (64, 32), dtype=torch.int8, generator=g)
    return torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())


@functools.cache
def dynamic_library() -> ctypes.CDLL | None:
    """The dynamic-activation passes, or None where they do not pay, cannot be built, or torch's
    integer product is not exact."""
    if not int8_units():
        return None
    if not exact_int_mm():
        log.warning("torch's int8 product is not exact on this CPU: int8 layers widen their weights for many rows")
        return None
    ptr, flag = ctypes.c_void_p, ctypes.c_int
    return load(DYNAMIC_SOURCE, DYNAMIC_FLAGS,
                {"blip2_quantize_rows": [ptr, flag, _INT, _INT, ptr, ptr, flag],
                 "blip2_scale_rows": [ptr, _INT, _INT, ptr, ptr, ptr, flag, ptr, flag, flag]},
                "int8 layers widen their weights for many rows")


def int8_dynamic_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] (bfloat16 or float32) times an int8 weight [N, K] with float32 row scales, plus a
    bias (bfloat16 or float32): each row of x quantized to int8 by its largest magnitude, the products
    summed in int32, scaled back and rounded to out_dtype (bfloat16 or float32) in one pass."""
    lib, threads = dynamic_library(), torch.get_num_threads()
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    q = torch.empty(m, k, dtype=torch.int8)
    row_scales = torch.empty(m, dtype=torch.float32)
    lib.blip2_quantize_rows(x.data_ptr(), x.dtype == torch.bfloat16, m, k, q.data_ptr(), row_scales.data_ptr(), threads)
    products = torch._int_mm(q, weight.t())
    out = torch.empty(m, n, dtype=out_dtype)
    lib.blip2_scale_rows(products.data_ptr(), m, n, row_scales.data_ptr(), scales.data_ptr(),
                         None if bias is None else bias.data_ptr(), bias is not None and bias.dtype == torch.bfloat16,
                         out.data_ptr(), out_dtype == torch.bfloat16, threads)
    return out


# Products on a weight laid out in pairs of inputs for 16 outputs (csrc/products_avx512.cpp), bfloat16
# or int8: a decoding row reads the weight near the memory's speed, about 1.4x oneDNN's bfloat16
# product and 1.7x torch's int8 kernel on an AVX-512 AMD EPYC, and many rows run at oneDNN's bfloat16
# rate (docs/log.md). CPUs with AMX keep oneDNN's and torch's: their prompt and image products use
# the tile units, which these do not.
PAIRS_SOURCE = Path(__file__).with_name("csrc") / "products_avx512.cpp"


@functools.cache
def pairs_library() -> ctypes.CDLL | None:
    """The products on the pair layout, or None where they do not pay or cannot be built."""
    if not pair_units():
        return None
    ptr, flag = ctypes.c_void_p, ctypes.c_int
    return load(PAIRS_SOURCE, PAIR_FLAGS,
                {"blip2_bf16_mm": [ptr, _INT, _INT, ptr, ptr, _INT, ptr, flag],
                 "blip2_int8_pairs_mm": INT8_PAIRS_ARGS},
                "bfloat16 and int8 layers use oneDNN's and torch's products")


def int8_pairs_library() -> ctypes.CDLL | None:
    """The library whose int8 product reads pair_layout here: the AVX-512 one (pair_units), else the
    AVX2 one where decoding uses blip2's products (preferred()); None elsewhere."""
    return pairs_library() or (library() if preferred() else None)


def pair_layout(weight: torch.Tensor) -> torch.Tensor:
    """A weight [N, K] (bfloat16 for bf16_mm, int8 for int8_pairs_mm) in pairs of inputs for 16 outputs:
    [ceil(N/16), ceil(K/2), 16, 2], padded with zeros."""
    n, k = weight.shape
    padded = torch.nn.functional.pad(weight, (0, k % 2, 0, -n % 16)) if k % 2 or n % 16 else weight
    blocks, pairs = padded.shape[0] // 16, padded.shape[1] // 2
    # moved a pair at a time, as one element twice as wide (about twice as fast as element by element)
    wide = {torch.bfloat16: torch.int32, torch.int8: torch.int16}[padded.dtype]
    moved = padded.contiguous().view(wide).view(blocks, 16, pairs).transpose(1, 2).contiguous()
    return moved.view(padded.dtype).view(blocks, pairs, 16, 2)


def bf16_layout(weight: torch.Tensor) -> torch.Tensor:
    """A float weight [N, K] in bfloat16, laid out for bf16_mm."""
    return pair_layout(weight.to(torch.bfloat16))


def plain_layout(weight: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The [N, K] weight back from its pair_layout form (a copy)."""
    blocks, pairs = weight.shape[:2]
    return weight.transpose(1, 2).reshape(blocks * 16, pairs * 2)[:shape[0], :shape[1]].contiguous()


def pair_rows(weight: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Rows `ids` of a [N, k] table held in pair_layout (token embeddings): [*ids.shape, k]."""
    rows = weight[ids // 16, :, ids % 16]  # [*ids.shape, ceil(k/2), 2]
    return rows.reshape(*ids.shape, -1)[..., :k]


def bf16_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """x [..., K] (bfloat16) times a weight in bf16_layout with N outputs, plus a bfloat16 bias: [..., N]."""
    if x.shape[-1] % 2:
        x = torch.nn.functional.pad(x, (0, 1))
    x = x.contiguous()
    if bias is not None and bias.dtype != torch.bfloat16:
        bias = bias.to(torch.bfloat16)
    k = x.shape[-1]
    m = x.numel() // k
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    if m:
        pairs_library().blip2_bf16_mm(x.data_ptr(), m, k, weight.data_ptr(), None if bias is None else bias.data_ptr(),
                                     n, y.data_ptr(), torch.get_num_threads())
    return y


def int8_pairs_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, n: int,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] (bfloat16 or float32) times an int8 weight in pair_layout with N outputs, each scaled by
    scales[N] (float32), plus a bias (bfloat16 or float32): [M, N] in out_dtype (bfloat16 or float32).
    x is quantized to 16 bits per row (steps of its largest magnitude / 32767) and multiplied as integers."""
    x = x.contiguous()
    m, k = x.shape
    k_even = weight.shape[1] * 2
    y = torch.empty(m, n, dtype=out_dtype)
    if m:
        scratch = torch.empty(m * (k_even // 2 + 1), dtype=torch.int32)
        int8_pairs_library().blip2_int8_pairs_mm(
            x.data_ptr(), x.dtype == torch.bfloat16, m, k, k_even, weight.data_ptr(), scales.data_ptr(),
            None if bias is None else bias.data_ptr(), bias is not None and bias.dtype == torch.bfloat16, n,
            y.data_ptr(), out_dtype == torch.bfloat16, scratch.data_ptr(), torch.get_num_threads())
    return y
