"""blip2's own CPU int4 product for a few rows (decoding), on AVX2 machines.

torch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu) is vectorised for AVX-512; on an AVX2-only
CPU it reads a decoded token's weights at about a fifth of the memory's speed, so an int4 token took
as long as an int8 one (BENCHMARKS.md, "CPU int4 decoding"). This product reads the same packed
weights, scales and zeros (torch's AVX2 layout, quantize._cpu_int4_layout with blocks of 32 rows)
and computes, per group of G inputs,

    y[m, n] += s[n, g] * sum_k q[n, k] x[m, k] + (z[n, g] - 8 s[n, g]) * sum_k x[m, k]

which is sum_k ((q - 8) s + z) x exactly: the codes become floats, each group's sum is scaled once,
and the activations stay float32. It is C++ with AVX2 intrinsics, compiled on first use with the
machine's C++ compiler (g++ or $CXX; well under a second, cached in ~/.cache/blip2/kernels), loaded
with ctypes, and threaded with OpenMP: the same libgomp torch runs on (same soname, loaded once), so
its threads are torch's. Where there is no compiler or no AVX2, `library()` is None and int4 products
use torch's kernel.
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

BLOCK = 32  # rows per block of torch's AVX2 layout, the only one this product reads
CHUNK = 2  # activation rows multiplied per pass over a block's weights (registers: 4 accumulators a row)

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

// One block of 32 output rows for MC activation rows. w: the block's codes, [K, 16] bytes, byte d of
// column k holding row d in its low nibble and row 16 + d in its high one. sz: the block's first
// row's (scale, zero) bfloat16 pairs; a group's pairs for all N rows are 2N values apart. x: MC rows
// K apart; xs: their group sums, K/G apart; y: MC rows N apart, at the block's first column.
template <int MC>
static void block_rows(const float *x, int64_t K, int64_t G, const uint8_t *w, const uint16_t *sz,
                       int64_t N, const float *xs, float *y) {
  const int64_t groups = K / G;
  const __m256i low = _mm256_set1_epi32(15);
  const __m256i upper = _mm256_set1_epi32((int)0xFFFF0000u);
  __m256 total[MC][4];
  for (int m = 0; m < MC; m++)
    for (int v = 0; v < 4; v++) total[m][v] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    __m256 acc[MC][4];
    for (int m = 0; m < MC; m++)
      for (int v = 0; v < 4; v++) acc[m][v] = _mm256_setzero_ps();
    const uint8_t *p = w + g * G * 16;
    const float *xg = x + g * G;
    for (int64_t k = 0; k < G; k++, p += 16) {
      const __m128i bytes = _mm_loadu_si128((const __m128i *)p);
      const __m256i b0 = _mm256_cvtepu8_epi32(bytes);                         // bytes 0-7
      const __m256i b1 = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes));  // bytes 8-15
      const __m256 q[4] = {_mm256_cvtepi32_ps(_mm256_and_si256(b0, low)),   // rows 0-7
                           _mm256_cvtepi32_ps(_mm256_and_si256(b1, low)),   // rows 8-15
                           _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)),    // rows 16-23
                           _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4))};   // rows 24-31
      for (int m = 0; m < MC; m++) {
        const __m256 xv = _mm256_broadcast_ss(xg + m * K + k);
        for (int v = 0; v < 4; v++) acc[m][v] = _mm256_fmadd_ps(q[v], xv, acc[m][v]);
      }
    }
    const uint16_t *pairs = sz + g * 2 * N;
    for (int v = 0; v < 4; v++) {  // rows 8v .. 8v + 7
      const __m256i u = _mm256_loadu_si256((const __m256i *)(pairs + 16 * v));
      const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));  // bfloat16 -> float32
      const __m256 z = _mm256_castsi256_ps(_mm256_and_si256(u, upper));
      const __m256 offset = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, z);  // z - 8 s
      for (int m = 0; m < MC; m++) {
        total[m][v] = _mm256_fmadd_ps(acc[m][v], s, total[m][v]);
        total[m][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(xs + m * groups + g), offset, total[m][v]);
      }
    }
  }
  for (int m = 0; m < MC; m++)
    for (int v = 0; v < 4; v++) _mm256_storeu_ps(y + m * N + 8 * v, total[m][v]);
}

// y [M, N] = x [M, K] times the weight [N, K]: N a multiple of 32, K of G.
extern "C" int blip2_int4_mm(const float *x, int64_t M, int64_t K, const uint8_t *w, const uint16_t *sz,
                             int64_t N, int64_t G, float *y, int threads) {
  const int64_t groups = K / G;
  float *xs = (float *)malloc(sizeof(float) * M * groups);
  if (!xs) return 1;
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < groups; g++) {
      float s = 0;
      for (int64_t k = 0; k < G; k++) s += x[m * K + g * G + k];
      xs[m * groups + g] = s;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < N / 32; b++) {
    const uint8_t *wb = w + b * 16 * K;
    const uint16_t *sb = sz + b * 64;
    int64_t m = 0;
    for (; m + CHUNK <= M; m += CHUNK) block_rows<CHUNK>(x + m * K, K, G, wb, sb, N, xs + m * groups, y + m * N + b * 32);
    for (; m < M; m++) block_rows<1>(x + m * K, K, G, wb, sb, N, xs + m * groups, y + m * N + b * 32);
  }
  free(xs);
  return 0;
}
"""
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", f"-DCHUNK={CHUNK}")


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "blip2" / "kernels"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled product, or None where it cannot run (no AVX2, or no compiler: then a warning
    says so once and torch's kernel serves)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    key = hashlib.sha256((SOURCE + " ".join(FLAGS) + torch.__version__).encode()).hexdigest()[:16]
    try:
        path = _compiled(f"int4_avx2-{key}.so")
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        log.warning("int4 products use torch's CPU kernel (slower on this AVX2 machine): "
                    "blip2's own could not be built: %s", e)
        return None
    fn = lib.blip2_int4_mm
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


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
            src = Path(tmp) / "int4.cpp"
            src.write_text(SOURCE)
            out = Path(tmp) / name
            run = subprocess.run([compiler, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True, timeout=300)
            if run.returncode:
                raise RuntimeError(f"{compiler} failed: {run.stderr.strip()[-2000:]}")
            os.replace(out, path)  # atomic: another process may be compiling the same
        return path
    raise RuntimeError("no writable cache directory for the compiled kernel")


def usable(weight: torch.Tensor, scales_and_zeros: torch.Tensor) -> bool:
    """Whether int4_mm takes this layer, packed in blocks of 32 rows: whole blocks, bfloat16 scales.
    (quantize.py uses it where torch's layout has such blocks, that is on AVX2 machines; on AVX-512
    ones torch's kernel is vectorised and lays blocks of 64 rows.)"""
    return (weight.device.type == "cpu" and weight.shape[0] % BLOCK == 0 and scales_and_zeros.dtype == torch.bfloat16
            and library() is not None)


def int4_mm(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] times an int4 weight in torch's AVX2 CPU layout (uint8 [N, K/2]; scales_and_zeros
    bfloat16 [K/G, N, 2]), in float32: [M, N]."""
    x = x.float().contiguous()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if library().blip2_int4_mm(x.data_ptr(), m, k, weight.data_ptr(), scales_and_zeros.data_ptr(), n, group_size,
                               y.data_ptr(), torch.get_num_threads()):
        raise MemoryError("blip2_int4_mm: out of memory")
    return y
