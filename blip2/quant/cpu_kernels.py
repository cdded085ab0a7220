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


def _compiled(name: str) -> Path:
    """The shared library `name`, compiled from SOURCE unless a cache directory already holds it."""
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
            run = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True, timeout=300)
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
