// Products on a weight laid out in pairs of inputs for 16 outputs, for CPUs with AVX-512 BF16 and
// VNNI: the register tiles that quant/csrc/products_avx512.cpp (linear layers) and
// models/csrc/attention_avx512.cpp (image attention) share. The layout:
//
//     w[n / 16][k / 2][16][2]   (n, k padded with zeros)
//
// bfloat16 weights: one 64-byte line holds inputs 2p and 2p+1 of 16 outputs; each step broadcasts a
// pair of x's inputs and multiplies it into the line with one vdpbf16ps, accumulating 16 outputs in
// float32. int8 weights (one scale per output): a 32-byte line, widened to 16-bit integers, times x
// quantized per row to 16-bit integers (its largest magnitude over 32767) with one vpdpwssd; the
// integer sums move to float32 every 128 pairs, before they can overflow (127 * 32767 * 256 < 2^31).
//
// There is no horizontal sum, a block of 16 outputs is read as one stream, and a decoding row reads
// the weight once, near the memory's speed (oneDNN's blocked layout reads it at about 0.7x; torch's
// int8 kernel at about 0.6x; docs/log.md). Many rows reuse each chunk of a panel of 64 outputs from
// cache: register tiles of 4 rows x 64 outputs run at the machine's vector rate.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace blip2 {

constexpr int ROWS = 4;  // rows of x per register tile: 4 x 4 accumulators, 4 lines, 1 broadcast

struct Bf16 {  // bfloat16 weights and activations; 512 pairs a chunk: 64 outputs x 1024 inputs = 128 KB
    static constexpr int64_t PAIRS_PER_CHUNK = 512;
    static constexpr int64_t LINE = 32;  // weight elements per line (16 outputs x 2 inputs)
    using Weight = uint16_t;
    using Acc = __m512;
    static Acc zero() { return _mm512_setzero_ps(); }
    static __m512i line(const Weight* w) { return _mm512_loadu_si512(w); }
    static Acc step(Acc acc, __m512i pair, __m512i line) { return _mm512_dpbf16_ps(acc, (__m512bh)pair, (__m512bh)line); }
    static __m512 to_float(Acc acc) { return acc; }
};

struct Int8 {  // int8 weights, 16-bit activations; 128 pairs a chunk (the integer sums' range)
    static constexpr int64_t PAIRS_PER_CHUNK = 128;
    static constexpr int64_t LINE = 32;
    using Weight = int8_t;
    using Acc = __m512i;
    static Acc zero() { return _mm512_setzero_si512(); }
    static __m512i line(const Weight* w) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))); }
    static Acc step(Acc acc, __m512i pair, __m512i line) { return _mm512_dpwssd_epi32(acc, line, pair); }
    static __m512 to_float(Acc acc) { return _mm512_cvtepi32_ps(acc); }
};

// sums[MR][NB*16] (+)= x[MR rows, pairs p0..p1) . w[NB blocks, pairs p0..p1); x's rows and w's blocks
// both hold `pairs` pairs (x padded as the weight is)
template <class K, int MR, int NB>
void tile(const uint32_t* x, const typename K::Weight* w, int64_t pairs, int64_t p0, int64_t p1, float* sums,
          bool first) {
    typename K::Acc acc[MR][NB];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NB; ++j) acc[i][j] = K::zero();
    for (int64_t p = p0; p < p1; ++p) {
        __m512i line[NB];
        for (int j = 0; j < NB; ++j) line[j] = K::line(w + (j * pairs + p) * K::LINE);
        for (int i = 0; i < MR; ++i) {
            const __m512i pair = _mm512_set1_epi32(static_cast<int>(x[i * pairs + p]));
            for (int j = 0; j < NB; ++j) acc[i][j] = K::step(acc[i][j], pair, line[j]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NB; ++j) {
            float* s = sums + (i * NB + j) * 16;
            const __m512 v = K::to_float(acc[i][j]);
            _mm512_storeu_ps(s, first ? v : _mm512_add_ps(_mm512_loadu_ps(s), v));
        }
}

template <class K, int NB>
void rows_of_tiles(int rows, const uint32_t* x, const typename K::Weight* w, int64_t pairs, int64_t p0, int64_t p1,
                   float* sums, bool first) {
    switch (rows) {
        case 4: tile<K, 4, NB>(x, w, pairs, p0, p1, sums, first); break;
        case 3: tile<K, 3, NB>(x, w, pairs, p0, p1, sums, first); break;
        case 2: tile<K, 2, NB>(x, w, pairs, p0, p1, sums, first); break;
        case 1: tile<K, 1, NB>(x, w, pairs, p0, p1, sums, first); break;
    }
}

// What happens to a row's 16 sums on the way out: scales (int8), bias, rounding.
struct Output {
    void* y;
    int y_bf16;
    const void* bias;
    int bias_bf16;
    const float* row_scales;     // int8: x's per-row scales, else null
    const float* column_scales;  // int8: the weight's per-output scales, else null
    int64_t n;
    int64_t stride = 0;  // elements from one row of y to the next; 0: n
};

// The lanes of 16 that hold values when `remaining` are left (all 16 from 16 on).
inline __mmask16 tail_mask(int64_t remaining) {
    return remaining >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << remaining) - 1);
}

inline __m512 load_bf16(const uint16_t* p, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

void write_row(const float* sums, int64_t row, int64_t col0, int64_t cols, const Output& out) {
    const int64_t stride = out.stride ? out.stride : out.n;
    for (int64_t c = 0; c < cols; c += 16) {
        const __mmask16 mask = tail_mask(cols - c);
        const int64_t at = col0 + c;
        __m512 v = _mm512_loadu_ps(sums + c);
        if (out.column_scales)
            v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(out.row_scales[row])),
                              _mm512_maskz_loadu_ps(mask, out.column_scales + at));
        if (out.bias)
            v = _mm512_add_ps(v, out.bias_bf16 ? load_bf16(static_cast<const uint16_t*>(out.bias) + at, mask)
                                               : _mm512_maskz_loadu_ps(mask, static_cast<const float*>(out.bias) + at));
        if (out.y_bf16)
            _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out.y) + row * stride + at, mask, (__m256i)_mm512_cvtneps_pbh(v));
        else
            _mm512_mask_storeu_ps(static_cast<float*>(out.y) + row * stride + at, mask, v);
    }
}

// One panel of NB blocks (NB * 16 outputs from column col0), all m rows; sums: m * NB * 16 floats.
template <class K, int NB>
void panel(const uint32_t* x, int64_t m, const typename K::Weight* w, int64_t pairs, int64_t col0, const Output& out,
           float* sums) {
    for (int64_t p0 = 0; p0 < pairs; p0 += K::PAIRS_PER_CHUNK) {
        const int64_t p1 = std::min(pairs, p0 + K::PAIRS_PER_CHUNK);
        for (int64_t i = 0; i < m; i += ROWS)
            rows_of_tiles<K, NB>(static_cast<int>(std::min<int64_t>(ROWS, m - i)), x + i * pairs, w, pairs, p0, p1,
                                 sums + i * NB * 16, p0 == 0);
    }
    const int64_t cols = std::min<int64_t>(NB * 16, out.n - col0);
    for (int64_t r = 0; r < m; ++r) write_row(sums + r * NB * 16, r, col0, cols, out);
}

// Panel q (blocks 4q..4q+3) of x's m rows of `pairs` pairs (32-bit words of two 16-bit values);
// sums: m * 64 floats of scratch.
template <class K>
void one_panel(const uint32_t* x, int64_t m, int64_t pairs, const typename K::Weight* w, const Output& out,
               int64_t q, float* sums) {
    const int64_t blocks = (out.n + 15) / 16, b = q * 4;
    const typename K::Weight* wq = w + b * pairs * K::LINE;
    switch (std::min<int64_t>(4, blocks - b)) {
        case 4: panel<K, 4>(x, m, wq, pairs, b * 16, out, sums); break;
        case 3: panel<K, 3>(x, m, wq, pairs, b * 16, out, sums); break;
        case 2: panel<K, 2>(x, m, wq, pairs, b * 16, out, sums); break;
        case 1: panel<K, 1>(x, m, wq, pairs, b * 16, out, sums); break;
    }
}

inline int64_t panels(int64_t n) { return ((n + 15) / 16 + 3) / 4; }

// All panels, threaded over panels.
template <class K>
void product(const uint32_t* x, int64_t m, int64_t pairs, const typename K::Weight* w, const Output& out,
             int threads) {
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> sums(static_cast<size_t>(m) * 64);
#pragma omp for schedule(static)
        for (int64_t q = 0; q < panels(out.n); ++q) one_panel<K>(x, m, pairs, w, out, q, sums.data());
    }
}

}  // namespace blip2
