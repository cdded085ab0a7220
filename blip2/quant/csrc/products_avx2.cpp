// blip2's int8, int4 and float32 products for AVX2 CPUs (see cpu_kernels.py): built on first use with
// g++ -O3 -mavx2 -mfma -fopenmp -shared -fPIC -DCHUNK=2, loaded with ctypes.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include <algorithm>
#include <vector>

#include "bf16.h"

// One block of 32 output rows for MC activation rows. w: the block's codes, [K, 16] bytes, byte d of
// column k holding row d in its low nibble and row 16 + d in its high one. sz: the block's first
// row's (scale, zero) bfloat16 pairs; a group's pairs for all N rows are 2N values apart. xq: MC rows
// of int16 activations K apart, each group's x / dx; xs, dx: their group sums and steps, K/G apart;
// y: MC rows N apart, at the block's first column. Codes and activations multiply as integers, two
// columns at a time (vpmaddwd): 1.5-1.8x faster than widening every code to float32 (OPT-2.7b's
// layers, one row), and exact but for the activations' rounding to 16 bits (3e-5 to 1.4e-4 relative
// on random layers, groups of 32 to 256).
template <int MC>
static void block_rows(const int16_t *xq, int64_t K, int64_t G, const uint8_t *w, const uint16_t *sz,
                       int64_t N, const float *xs, const float *dx, float *y) {
  const int64_t groups = K / G;
  const __m256i low = _mm256_set1_epi16(15);
  const __m256i upper = _mm256_set1_epi32((int)0xFFFF0000u);
  __m256 total[MC][4];
  for (int m = 0; m < MC; m++)
    for (int v = 0; v < 4; v++) total[m][v] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    __m256i acc[MC][4];  // |sum| <= 256 * 15 * 32767 < 2^31
    for (int m = 0; m < MC; m++)
      for (int v = 0; v < 4; v++) acc[m][v] = _mm256_setzero_si256();
    const uint8_t *p = w + g * G * 16;
    const int16_t *xg = xq + g * G;
    for (int64_t k = 0; k < G; k += 2, p += 32) {
      const __m128i a = _mm_loadu_si128((const __m128i *)p), b = _mm_loadu_si128((const __m128i *)(p + 16));
      // each row's codes of columns k and k + 1 side by side, as int16
      const __m256i v0 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b));  // bytes 0-7
      const __m256i v1 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b));  // bytes 8-15
      // named, not an array: with an array g++ 12 may keep the accumulators on the stack
      const __m256i q0 = _mm256_and_si256(v0, low), q1 = _mm256_and_si256(v1, low);  // rows 0-7, 8-15
      const __m256i q2 = _mm256_srli_epi16(v0, 4), q3 = _mm256_srli_epi16(v1, 4);    // rows 16-23, 24-31
      for (int m = 0; m < MC; m++) {
        int32_t pair;  // x[k], x[k + 1]
        __builtin_memcpy(&pair, xg + m * K + k, 4);
        const __m256i xp = _mm256_set1_epi32(pair);
        acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(q0, xp));
        acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(q1, xp));
        acc[m][2] = _mm256_add_epi32(acc[m][2], _mm256_madd_epi16(q2, xp));
        acc[m][3] = _mm256_add_epi32(acc[m][3], _mm256_madd_epi16(q3, xp));
      }
    }
    const uint16_t *pairs = sz + g * 2 * N;
    for (int v = 0; v < 4; v++) {  // rows 8v .. 8v + 7
      const __m256i u = _mm256_loadu_si256((const __m256i *)(pairs + 16 * v));
      const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));  // bfloat16 -> float32
      const __m256 z = _mm256_castsi256_ps(_mm256_and_si256(u, upper));
      const __m256 offset = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, z);  // z - 8 s
      for (int m = 0; m < MC; m++) {
        const __m256 step = _mm256_mul_ps(s, _mm256_broadcast_ss(dx + m * groups + g));
        total[m][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][v]), step, total[m][v]);
        total[m][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(xs + m * groups + g), offset, total[m][v]);
      }
    }
  }
  for (int m = 0; m < MC; m++)
    for (int v = 0; v < 4; v++) _mm256_storeu_ps(y + m * N + 8 * v, total[m][v]);
}

// How the products on weights in blocks of 16 outputs walk them (the int8 and float32 ones below): a
// decoding row (m <= 2) reads four blocks at once, four streams, `four(b0, nb, sums)` filling m rows
// of 64 sums for blocks b0.. b0 + nb; more rows go block by block, `one(b, sums)` filling m rows of
// 16. `out(sums, width, cols, col0)` writes `cols` outputs from col0 of each row of `width` sums.
template <class Four, class One, class Out>
static void walk_blocks(int64_t m, int64_t n, int threads, Four four, One one, Out out) {
  const int64_t blocks = (n + 15) / 16;
  if (m <= 2) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t q = 0; q < (blocks + 3) / 4; q++) {
      float sums[2 * 64];
      four(q * 4, (int)std::min<int64_t>(4, blocks - q * 4), sums);
      out(sums, 64, std::min<int64_t>(64, n - q * 64), q * 64);
    }
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> sums(m * 16);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
      one(b, sums.data());
      out(sums.data(), 16, std::min<int64_t>(16, n - b * 16), b * 16);
    }
  }
}

// int8 products on the weight in pairs of inputs for 16 outputs (cpu_kernels.pair_layout, as the
// AVX-512 product reads it: w[n / 16][k / 2][16][2], n and k padded with zeros; one scale per output),
// x quantized per row to 16-bit integers (its largest magnitude over 32767): each 32-byte line (inputs
// 2p and 2p + 1 of 16 outputs) is widened to two vectors of int16 and multiplied into a broadcast pair
// of x with vpmaddwd. The integer sums move to float every 128 pairs, before they can overflow
// (256 * 128 * 32767 < 2^31). There is no horizontal sum and a block of 16 outputs is one stream: a
// decoding row (m <= 2) reads four blocks at once, as the float32 product below; more rows go block by
// block in register tiles of 6 rows over chunks of 128 pairs that stay in L1.
namespace i8 {

constexpr int64_t PC = 128;

// MR rows of x (pairs apart, 32-bit words of two int16) times NB blocks over pairs p0..p1, into sums
// (MR rows of `width`, NB * 16 each); always inlined (see f32::tile).
template <int MR, int NB>
__attribute__((always_inline)) static inline void tile(const int32_t *x, int64_t pairs, const int8_t *w, int64_t p0,
                                                       int64_t p1, float *s, int64_t width, bool first) {
  __m256i acc[MR][2 * NB];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < 2 * NB; j++) acc[i][j] = _mm256_setzero_si256();
  for (int64_t p = p0; p < p1; p++) {
    __m256i line[2 * NB];  // outputs 0-7 and 8-15 of each block, their two inputs side by side
    for (int j = 0; j < NB; j++) {
      const int8_t *l = w + (j * pairs + p) * 32;
      line[2 * j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)l));
      line[2 * j + 1] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(l + 16)));
    }
    for (int i = 0; i < MR; i++) {
      const __m256i b = _mm256_set1_epi32(x[i * pairs + p]);
      for (int j = 0; j < 2 * NB; j++) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(line[j], b));
    }
  }
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < 2 * NB; j++) {
      float *q = s + i * width + j * 8;
      const __m256 v = _mm256_cvtepi32_ps(acc[i][j]);
      _mm256_storeu_ps(q, first ? v : _mm256_add_ps(_mm256_loadu_ps(q), v));
    }
}

// one or two rows times nb <= 4 consecutive blocks, pairs p0..p1; sums: rows x 64
__attribute__((noinline)) static void row_blocks(const int32_t *x, int64_t rows, int64_t pairs, const int8_t *w, int nb,
                                                 int64_t p0, int64_t p1, float *sums) {
  for (int64_t r = 0; r < rows; r++) switch (nb) {
      case 4: tile<1, 4>(x + r * pairs, pairs, w, p0, p1, sums + r * 64, 64, p0 == 0); break;
      case 3: tile<1, 3>(x + r * pairs, pairs, w, p0, p1, sums + r * 64, 64, p0 == 0); break;
      case 2: tile<1, 2>(x + r * pairs, pairs, w, p0, p1, sums + r * 64, 64, p0 == 0); break;
      case 1: tile<1, 1>(x + r * pairs, pairs, w, p0, p1, sums + r * 64, 64, p0 == 0); break;
    }
}

// m rows of x times one block, pairs p0..p1; sums: m x 16
__attribute__((noinline)) static void block_rows(const int32_t *x, int64_t m, int64_t pairs, const int8_t *w, int64_t p0,
                                                 int64_t p1, float *sums) {
  const bool first = p0 == 0;
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) tile<4, 1>(x + i * pairs, pairs, w, p0, p1, sums + i * 16, 16, first);
  switch (m - i) {
    case 3: tile<3, 1>(x + i * pairs, pairs, w, p0, p1, sums + i * 16, 16, first); break;
    case 2: tile<2, 1>(x + i * pairs, pairs, w, p0, p1, sums + i * 16, 16, first); break;
    case 1: tile<1, 1>(x + i * pairs, pairs, w, p0, p1, sums + i * 16, 16, first); break;
  }
}

// y[r, col0 + c] = sums[r, c] * row_scales[r] * scales[col0 + c] + bias[col0 + c], float32 or bfloat16
inline void write(const float *sums, int64_t rows, int64_t width, int64_t cols, int64_t col0, const float *row_scales,
                  const float *scales, const void *bias, int bias_bf16, void *y, int y_bf16, int64_t n) {
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < cols; c++) {
      const int64_t at = col0 + c;
      float v = sums[r * width + c] * row_scales[r] * scales[at];
      if (bias) v += bias_bf16 ? blip2::from_bf16(((const uint16_t *)bias)[at]) : ((const float *)bias)[at];
      if (y_bf16)
        ((uint16_t *)y)[r * n + at] = blip2::to_bf16(v);
      else
        ((float *)y)[r * n + at] = v;
    }
}

}  // namespace i8

// y[m, n] = (x[m, k] w[n, k]^T) * scales[n] + bias[n] for int8 w in pair_layout (k_even: its padded
// k), x bfloat16 or float32 (x_bf16), quantized here to 16 bits a row; y bfloat16 or float32 (y_bf16);
// bias bfloat16 or float32 (bias_bf16) or null. scratch: m * (k_even / 2 + 1) 32-bit words. The
// AVX-512 product (products_avx512.cpp) takes the same arguments.
extern "C" void blip2_int8_pairs_mm(const void *x, int x_bf16, int64_t m, int64_t k, int64_t k_even, const int8_t *w,
                                    const float *scales, const void *bias, int bias_bf16, int64_t n, void *y, int y_bf16,
                                    uint32_t *scratch, int threads) {
  const float *row_scales = blip2::quantize_pair_rows(x, x_bf16, m, k, k_even, scratch, threads);
  const auto *xp = reinterpret_cast<const int32_t *>(scratch);
  const int64_t pairs = k_even / 2;
  walk_blocks(
      m, n, threads,
      [&](int64_t b0, int nb, float *sums) {
        for (int64_t p0 = 0; p0 < pairs; p0 += i8::PC)
          i8::row_blocks(xp, m, pairs, w + b0 * pairs * 32, nb, p0, std::min(pairs, p0 + i8::PC), sums);
      },
      [&](int64_t b, float *sums) {
        for (int64_t p0 = 0; p0 < pairs; p0 += i8::PC)
          i8::block_rows(xp, m, pairs, w + b * pairs * 32, p0, std::min(pairs, p0 + i8::PC), sums);
      },
      [&](const float *sums, int64_t width, int64_t cols, int64_t col0) {
        i8::write(sums, m, width, cols, col0, row_scales, scales, bias, bias_bf16, y, y_bf16, n);
      });
}

// y [M, N] = x [M, K] times the int4 weight [N, K]: N a multiple of 32, K of G, G even.
extern "C" int blip2_int4_mm(const float *x, int64_t M, int64_t K, const uint8_t *w, const uint16_t *sz,
                             int64_t N, int64_t G, float *y, int threads) {
  const int64_t groups = K / G;
  float *xs = (float *)malloc(sizeof(float) * M * groups * 2);
  int16_t *xq = (int16_t *)malloc(sizeof(int16_t) * M * K);
  if (!xs || !xq) {
    free(xs);
    free(xq);
    return 1;
  }
  float *dx = xs + M * groups;
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < groups; g++) {  // each group's sum, and its values as int16 steps of dx
      const float *xg = x + m * K + g * G;
      float sum = 0, top = 0;
      for (int64_t k = 0; k < G; k++) {
        sum += xg[k];
        top = fmaxf(top, fabsf(xg[k]));
      }
      xs[m * groups + g] = sum;
      dx[m * groups + g] = top / 32767.0f;
      const float inv = top > 0 ? 32767.0f / top : 0.0f;
      for (int64_t k = 0; k < G; k++) xq[m * K + g * G + k] = (int16_t)lrintf(xg[k] * inv);
    }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < N / 32; b++) {
    const uint8_t *wb = w + b * 16 * K;
    const uint16_t *sb = sz + b * 64;
    int64_t m = 0;
    for (; m + CHUNK <= M; m += CHUNK)
      block_rows<CHUNK>(xq + m * K, K, G, wb, sb, N, xs + m * groups, dx + m * groups, y + m * N + b * 32);
    for (; m < M; m++) block_rows<1>(xq + m * K, K, G, wb, sb, N, xs + m * groups, dx + m * groups, y + m * N + b * 32);
  }
  free(xs);
  free(xq);
  return 0;
}

// float32 products on a weight laid out once, at load, as w[n / 16][k][16] (16 outputs of one input
// in 64 bytes; n padded with zeros): y[m, n] = x[m, k] w^T + bias. A decoding row (m <= 2) multiplies
// four blocks at once, four weight streams, which read 1.2-1.5x faster than oneDNN's AVX2 product
// of a weight packed for one row; more rows go block by block in register tiles of 6 rows x 16
// outputs over chunks of 256 inputs that stay in L1, at oneDNN's rate.
namespace f32 {

constexpr int64_t KC = 256;

// MR rows of x (K apart) times one block over inputs k0..k1, into sums (MR x 16). Always inlined into
// a caller that is not: left to itself, g++ 12 keeps the accumulators on the stack (half the speed).
template <int MR>
__attribute__((always_inline)) static inline void tile(const float *x, int64_t K, const float *w, int64_t k0,
                                                       int64_t k1, float *s, bool first) {
  __m256 lo[MR], hi[MR];
  for (int i = 0; i < MR; i++) lo[i] = hi[i] = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; k++) {
    const __m256 l0 = _mm256_loadu_ps(w + k * 16), l1 = _mm256_loadu_ps(w + k * 16 + 8);
    for (int i = 0; i < MR; i++) {
      const __m256 b = _mm256_broadcast_ss(x + i * K + k);
      lo[i] = _mm256_fmadd_ps(l0, b, lo[i]);
      hi[i] = _mm256_fmadd_ps(l1, b, hi[i]);
    }
  }
  for (int i = 0; i < MR; i++) {
    float *p = s + i * 16;
    _mm256_storeu_ps(p, first ? lo[i] : _mm256_add_ps(_mm256_loadu_ps(p), lo[i]));
    _mm256_storeu_ps(p + 8, first ? hi[i] : _mm256_add_ps(_mm256_loadu_ps(p + 8), hi[i]));
  }
}

// m rows of x times one block, inputs k0..k1; sums: m x 16
__attribute__((noinline)) static void block_rows(const float *x, int64_t m, int64_t K, const float *w, int64_t k0,
                                                 int64_t k1, float *sums) {
  const bool first = k0 == 0;
  int64_t i = 0;
  for (; i + 6 <= m; i += 6) tile<6>(x + i * K, K, w, k0, k1, sums + i * 16, first);
  switch (m - i) {
    case 5: tile<5>(x + i * K, K, w, k0, k1, sums + i * 16, first); break;
    case 4: tile<4>(x + i * K, K, w, k0, k1, sums + i * 16, first); break;
    case 3: tile<3>(x + i * K, K, w, k0, k1, sums + i * 16, first); break;
    case 2: tile<2>(x + i * K, K, w, k0, k1, sums + i * 16, first); break;
    case 1: tile<1>(x + i * K, K, w, k0, k1, sums + i * 16, first); break;
  }
}

// one row times nb <= 4 consecutive blocks, inputs k0..k1; sums: nb x 16
inline void row_blocks(const float *x, int64_t K, const float *w, int nb, int64_t k0, int64_t k1, float *sums) {
  __m256 acc[8];
  for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; k++) {
    const __m256 b = _mm256_broadcast_ss(x + k);
    for (int j = 0; j < nb; j++) {
      acc[2 * j] = _mm256_fmadd_ps(_mm256_loadu_ps(w + (j * K + k) * 16), b, acc[2 * j]);
      acc[2 * j + 1] = _mm256_fmadd_ps(_mm256_loadu_ps(w + (j * K + k) * 16 + 8), b, acc[2 * j + 1]);
    }
  }
  for (int j = 0; j < 2 * nb; j++) {
    float *p = sums + j * 8;
    _mm256_storeu_ps(p, k0 == 0 ? acc[j] : _mm256_add_ps(_mm256_loadu_ps(p), acc[j]));
  }
}

// sums (rows x `width`, of which `cols` are outputs from col0) plus bias into y
inline void write(const float *sums, int64_t rows, int64_t width, int64_t cols, int64_t col0, const float *bias,
                  float *y, int64_t n) {
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < cols; c++) y[r * n + col0 + c] = sums[r * width + c] + (bias ? bias[col0 + c] : 0.f);
}

}  // namespace f32

extern "C" void blip2_f32_mm(const float *x, int64_t m, int64_t K, const float *w, const float *bias, int64_t n,
                             float *y, int threads) {
  walk_blocks(
      m, n, threads,
      [&](int64_t b0, int nb, float *sums) {
        for (int64_t k0 = 0; k0 < K; k0 += 4 * f32::KC)
          for (int64_t r = 0; r < m; r++)
            f32::row_blocks(x + r * K, K, w + b0 * K * 16, nb, k0, std::min(K, k0 + 4 * f32::KC), sums + r * 64);
      },
      [&](int64_t b, float *sums) {
        for (int64_t k0 = 0; k0 < K; k0 += f32::KC)
          f32::block_rows(x, m, K, w + b * K * 16, k0, std::min(K, k0 + f32::KC), sums);
      },
      [&](const float *sums, int64_t width, int64_t cols, int64_t col0) {
        f32::write(sums, m, width, cols, col0, bias, y, n);
      });
}
