// bfloat16 products for CPUs with AVX512-BF16 (quant/cpu_kernels.py, quant/packed.py): y = x w^T + b
// for any number of rows, on a weight laid out once, at load, in pairs of inputs for 16 outputs:
//
//     w[n / 16][k / 2][16][2]   (one 64-byte line: inputs 2p and 2p+1 of 16 outputs; n, k padded)
//
// Each step broadcasts a pair of x's inputs and multiplies it into a line with one vdpbf16ps,
// accumulating 16 outputs in float32, so there is no horizontal sum, a block of 16 outputs is read as
// one stream, and a decoding row reads the weight once, near the memory's speed (oneDNN's layout
// for AVX-512 reads it at about 0.7x; docs/log.md). Many rows reuse the same lines from L2: a
// register tile of 4 rows x 64 outputs over chunks of 1024 inputs (a 128 KB panel) runs at the
// machine's bfloat16 rate.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t PAIRS_PER_CHUNK = 512;  // 1024 inputs: 64 outputs x 1024 x 2 bytes = 128 KB, in L2
constexpr int ROWS = 4;                    // rows of x per register tile (4 x 4 accumulators + 4 lines)

// acc[MR][NB] (+)= x[MR rows, pairs p0..p1) . w[NB blocks, pairs p0..p1); partial sums kept in `sums`
template <int MR, int NB>
void tile(const uint32_t* x, int64_t x_pairs, const uint16_t* w, int64_t pairs, int64_t p0, int64_t p1,
          float* sums, bool first) {
    __m512 acc[MR][NB];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NB; ++j) acc[i][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(sums + (i * NB + j) * 16);
    for (int64_t p = p0; p < p1; ++p) {
        __m512i line[NB];
        for (int j = 0; j < NB; ++j) line[j] = _mm512_loadu_si512(w + (j * pairs + p) * 32);
        for (int i = 0; i < MR; ++i) {
            const __m512bh pair = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[i * x_pairs + p]));
            for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], pair, (__m512bh)line[j]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NB; ++j) _mm512_storeu_ps(sums + (i * NB + j) * 16, acc[i][j]);
}

template <int NB>
void rows_of_tiles(int rows, const uint32_t* x, int64_t x_pairs, const uint16_t* w, int64_t pairs, int64_t p0,
                   int64_t p1, float* sums, bool first) {
    switch (rows) {
        case 4: tile<4, NB>(x, x_pairs, w, pairs, p0, p1, sums, first); break;
        case 3: tile<3, NB>(x, x_pairs, w, pairs, p0, p1, sums, first); break;
        case 2: tile<2, NB>(x, x_pairs, w, pairs, p0, p1, sums, first); break;
        case 1: tile<1, NB>(x, x_pairs, w, pairs, p0, p1, sums, first); break;
    }
}

// One panel of NB blocks (NB * 16 outputs from column col0), all m rows; sums: m * NB * 16 floats.
template <int NB>
void panel(const uint16_t* x, int64_t m, int64_t k, const uint16_t* w, int64_t pairs, const uint16_t* bias,
           int64_t n, int64_t col0, uint16_t* y, float* sums) {
    const auto* xp = reinterpret_cast<const uint32_t*>(x);
    const int64_t x_pairs = k / 2;
    for (int64_t p0 = 0; p0 < pairs; p0 += PAIRS_PER_CHUNK) {
        const int64_t p1 = std::min(pairs, p0 + PAIRS_PER_CHUNK);
        for (int64_t i = 0; i < m; i += ROWS)
            rows_of_tiles<NB>(static_cast<int>(std::min<int64_t>(ROWS, m - i)), xp + i * x_pairs, x_pairs, w, pairs,
                              p0, p1, sums + i * NB * 16, p0 == 0);
    }
    const int64_t cols = std::min<int64_t>(NB * 16, n - col0);
    for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < cols; c += 16) {
            const __mmask16 mask = cols - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (cols - c)) - 1);
            __m512 v = _mm512_loadu_ps(sums + r * NB * 16 + c);
            if (bias) {  // bfloat16 to float32: the 16 bits on top
                const __m256i b = _mm256_maskz_loadu_epi16(mask, bias + col0 + c);
                v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
            }
            _mm256_mask_storeu_epi16(y + r * n + col0 + c, mask, (__m256i)_mm512_cvtneps_pbh(v));
        }
}

}  // namespace

// y[m, n] = x[m, k] w[n, k]^T + bias[n], bfloat16 in and out (float32 sums, rounded to nearest even);
// k even (the caller pads x), w in the layout above, bias may be null.
extern "C" void blip2_bf16_mm(const uint16_t* x, int64_t m, int64_t k, const uint16_t* w, const uint16_t* bias,
                              int64_t n, uint16_t* y, int threads) {
    const int64_t pairs = k / 2, blocks = (n + 15) / 16, panels = (blocks + 3) / 4;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> sums(static_cast<size_t>(m) * 64);
#pragma omp for schedule(static)
        for (int64_t q = 0; q < panels; ++q) {
            const int64_t b = q * 4;
            const uint16_t* wq = w + b * pairs * 32;
            switch (std::min<int64_t>(4, blocks - b)) {
                case 4: panel<4>(x, m, k, wq, pairs, bias, n, b * 16, y, sums.data()); break;
                case 3: panel<3>(x, m, k, wq, pairs, bias, n, b * 16, y, sums.data()); break;
                case 2: panel<2>(x, m, k, wq, pairs, bias, n, b * 16, y, sums.data()); break;
                case 1: panel<1>(x, m, k, wq, pairs, bias, n, b * 16, y, sums.data()); break;
            }
        }
    }
}
