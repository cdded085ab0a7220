"""blip2's own CPU products with int8 and int4 weights for up to 256 rows (decoding, prompts), on AVX2 machines.

torch's CPU weight-only kernels (aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu) are
vectorised for AVX-512; on an AVX2-only CPU they read a decoded token's weights well below the
memory's speed (int4 took as long as int8; BENCHMARKS.md, "CPU, session 9"). These products read
the same tensors the layers hold (int8: [N, K] codes and one scale per row; int4: torch's AVX2 layout,
quantize._cpu_int4_layout with blocks of 32 rows, and its [K/G, N, 2] bfloat16 scales and zeros).
int8 multiplies float32 activations as they are (torch's kernels take them rounded to bfloat16).
int4 computes, per group of G inputs,

    y[m, n] += s[n, g] * dx[m, g] * sum_k q[n, k] xq[m, k] + (z[n, g] - 8 s[n, g]) * sum_k x[m, k]

which is sum_k ((q - 8) s + z) x but for xq = round(x / dx), the activations in 16-bit steps of
each group's largest (dx = max |x| / 32767): codes and activations then multiply as integers, two
columns per instruction, and each group's sum is scaled once. Against the exact product of the
quantized weight that is 3e-5 to 1.4e-4 off, torch's bfloat16 activations 2.3e-3 (a group whose
largest value is 100x the others', as outlier features make them, still rounds those others by
about 1e-3 at most, bfloat16's own step).

They are C++ with AVX2 intrinsics (csrc/products_avx2.cpp), compiled on first use by the machine's C++ compiler (g++ or $CXX;
about a second, cached in ~/.cache/blip2/kernels), loaded with ctypes and threaded with OpenMP: the
libgomp torch runs on (same soname, loaded once), so their threads are torch's. Where there is no
compiler or no AVX2, `library()` is None and the layers use torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BLOCK = 32  # rows per block of torch's AVX2 int4 layout, the only one int4_mm reads
CHUNK = 2  # activation rows multiplied per pass over the weights (registers: 4 accumulators a row)

SOURCE = Path(__file__).with_name("csrc") / "products_avx2.cpp"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", f"-DCHUNK={CHUNK}")
_INT = ctypes.c_int64


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "blip2" / "kernels"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled products, or None where they cannot run (no AVX2, or no compiler: then a warning
    says so once and torch's kernels serve)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    key = hashlib.sha256((SOURCE.read_text() + " ".join(FLAGS) + torch.__version__).encode()).hexdigest()[:16]
    try:
        path = _compiled(f"products_avx2-{key}.so")
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        log.warning("int8/int4 products use torch's CPU kernels (slower on an AVX2 machine): "
                    "blip2's own could not be built: %s", e)
        return None
    ptr = ctypes.c_void_p
    lib.blip2_int4_mm.argtypes = [ptr, _INT, _INT, ptr, ptr, _INT, _INT, ptr, ctypes.c_int]
    lib.blip2_int4_mm.restype = ctypes.c_int
    lib.blip2_int8_mm.argtypes = [ptr, _INT, _INT, ptr, ptr, ctypes.c_int, _INT, ptr, ctypes.c_int]
    lib.blip2_int8_mm.restype = None
    return lib


def preferred() -> bool:
    """Whether decoding steps use these products: on AVX2 machines, where they are built. (On AVX-512
    ones torch's kernels are vectorised, and torch lays int4 weights in blocks of 64 rows.)"""
    return torch.backends.cpu.get_cpu_capability() == "AVX2" and library() is not None


def _compiled(name: str, source: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> Path:
    """The shared library `name`, compiled from `source` unless a cache directory already holds it."""
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / "blip2-kernels"):
        path = directory / name
        if path.exists():
            return path
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if not compiler:
            raise RuntimeError("no C++ compiler found (g++, c++ or $CXX)")
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            out = Path(tmp) / name
            run = subprocess.run([compiler, *flags, str(source), "-o", str(out)], capture_output=True, text=True, timeout=300)
            if run.returncode:
                raise RuntimeError(f"{compiler} failed: {run.stderr.strip()[-2000:]}")
            os.replace(out, path)  # atomic: another process may be compiling the same
        return path
    raise RuntimeError("no writable cache directory for the compiled kernel")


def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] times an int8 weight [N, K] (K a multiple of 8), row n scaled by scales[n] (float32
    or bfloat16), in float32: [M, N]."""
    x = x.float().contiguous()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    library().blip2_int8_mm(x.data_ptr(), m, k, weight.data_ptr(), scales.data_ptr(), scales.dtype == torch.bfloat16,
                            n, y.data_ptr(), torch.get_num_threads())
    return y


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
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "amx_int8" in flags


@functools.cache
def dynamic_library() -> ctypes.CDLL | None:
    """The dynamic-activation passes, or None where they do not pay or cannot be built."""
    if not int8_units():
        return None
    key = hashlib.sha256((DYNAMIC_SOURCE.read_text() + " ".join(DYNAMIC_FLAGS) + torch.__version__).encode()).hexdigest()[:16]
    try:
        lib = ctypes.CDLL(str(_compiled(f"dynamic_int8-{key}.so", DYNAMIC_SOURCE, DYNAMIC_FLAGS)))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        log.warning("int8 layers widen their weights for many rows: the dynamic int8 passes could not be built: %s", e)
        return None
    ptr = ctypes.c_void_p
    lib.blip2_quantize_rows.argtypes = [ptr, ctypes.c_int, _INT, _INT, ptr, ptr, ctypes.c_int]
    lib.blip2_quantize_rows.restype = None
    lib.blip2_scale_rows.argtypes = [ptr, _INT, _INT, ptr, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int]
    lib.blip2_scale_rows.restype = None
    return lib


def int8_dynamic_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] (bfloat16 or float32) times an int8 weight [N, K] with float32 row scales, plus a
    float32 bias: each row of x quantized to int8 by its largest magnitude, the products summed in
    int32, scaled back and rounded to out_dtype (bfloat16 or float32) in one pass."""
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
                         None if bias is None else bias.data_ptr(), out.data_ptr(), out_dtype == torch.bfloat16, threads)
    return out
