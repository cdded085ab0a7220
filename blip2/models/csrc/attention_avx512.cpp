// Attention of every position to every other without a mask (the image encoder's), bfloat16, for
// CPUs with AVX-512 BF16 and VNNI (models/layers.py). For each (batch, head), on one thread:
// the keys laid out in pairs for the scores' product, the scores q k^T * scale in float32, their
// softmax rounded to bfloat16 (as torch's flash attention rounds it before the second product), the
// values laid out in pairs, and the output p v in float32 sums rounded to bfloat16: both products on
// the register tiles of blip2/csrc/pairs_avx512.h. torch's flash attention, tiled for long sequences,
// runs a ViT-g head (257 positions of 88) at about a quarter of the machine's bfloat16 rate.
#include <limits>
#include <vector>

#include "bf16.h"
#include "pairs_avx512.h"

using namespace blip2;

namespace {

// e^x for x <= 0 (softmax after subtracting the row's largest): 2^n * 2^f, f in [-0.5, 0.5], by its
// Taylor series to f^7 (relative error below 1e-7, far under bfloat16's 4e-3); e^-inf is 0.
inline __m512 exp_nonpositive(__m512 x) {
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(1.44269504f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147181f));  // f ln 2
    __m512 p = _mm512_set1_ps(1.f / 5040.f);
    for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    return _mm512_scalef_ps(p, n);
}

// w[n / 16][k / 2][16][2] from the n x k matrix whose element (r, c) is at src[r * r_stride + c * c_stride]
// (the keys: positions x dims; the values: dims x positions), zeros past n and k. Value by value: a
// vectorised layout (a gather per line for the keys, two rows interleaved for the values) saved 1 of
// 13 ms a ViT-g layer of 8 images.
void pairs_of(const uint16_t* src, int64_t n, int64_t k, int64_t r_stride, int64_t c_stride, uint16_t* w) {
    for (int64_t b = 0; b < (n + 15) / 16; ++b)
        for (int64_t p = 0; p < (k + 1) / 2; ++p)
            for (int64_t j = 0; j < 16; ++j)
                for (int64_t t = 0; t < 2; ++t) {
                    const int64_t r = b * 16 + j, c = 2 * p + t;
                    *w++ = r < n && c < k ? src[r * r_stride + c * c_stride] : 0;
                }
}

}  // namespace

// out[b, l, h, :] = softmax(q k^T * scale) v for q, k, v [B, H, L, D] given by their batch, head and
// position strides (D contiguous and even), out [B, L, H, D] contiguous (ready for the projection).
extern "C" void blip2_image_attention(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int64_t* strides,
                                      int64_t batch, int64_t heads, int64_t length, int64_t dim, float scale,
                                      uint16_t* out, int threads) {
    const int64_t length_even = length + length % 2, dim_pairs = dim / 2;
#pragma omp parallel num_threads(threads)
    {
        std::vector<uint16_t> keys(static_cast<size_t>((length + 15) / 16 * 16 * dim));
        std::vector<uint16_t> values(static_cast<size_t>((dim + 15) / 16 * 16 * length_even));
        std::vector<float> scores(static_cast<size_t>(length * length));
        std::vector<uint16_t> probabilities(static_cast<size_t>(length * length_even));
        std::vector<float> sums(static_cast<size_t>(length * 64));
        std::vector<uint16_t> packed_q(static_cast<size_t>(length * dim));
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < batch * heads; ++bh) {
            const int64_t b = bh / heads, h = bh % heads;
            const uint16_t* qh = q + b * strides[0] + h * strides[1];
            const uint16_t* kh = k + b * strides[3] + h * strides[4];
            const uint16_t* vh = v + b * strides[6] + h * strides[7];
            if (strides[2] != dim) {  // the query rows gathered, as the product reads rows of pairs
                for (int64_t l = 0; l < length; ++l) std::memcpy(&packed_q[l * dim], qh + l * strides[2], dim * 2);
                qh = packed_q.data();
            }
            pairs_of(kh, length, dim, strides[5], 1, keys.data());
            const Output to_scores{scores.data(), 0, nullptr, 0, nullptr, nullptr, length};
            for (int64_t p = 0; p < panels(length); ++p)
                one_panel<Bf16>(reinterpret_cast<const uint32_t*>(qh), length, dim_pairs, keys.data(), to_scores, p,
                                sums.data());
            for (int64_t r = 0; r < length; ++r) {
                float* row = &scores[r * length];
                __m512 largest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
                for (int64_t c = 0; c < length; c += 16) {
                    const __mmask16 mask = tail_mask(length - c);
                    largest = _mm512_max_ps(largest, _mm512_mask_loadu_ps(largest, mask, row + c));
                }
                const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(largest) * scale);
                __m512 total = _mm512_setzero_ps();
                for (int64_t c = 0; c < length; c += 16) {
                    const __mmask16 mask = tail_mask(length - c);
                    const __m512 e = exp_nonpositive(
                        _mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + c), _mm512_set1_ps(scale)), top));
                    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(mask, e));
                    _mm512_mask_storeu_ps(row + c, mask, e);
                }
                const __m512 inverse = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
                uint16_t* p = &probabilities[r * length_even];
                for (int64_t c = 0; c < length; c += 16) {
                    const __mmask16 mask = tail_mask(length - c);
                    const __m512 e = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + c), inverse);
                    _mm256_mask_storeu_epi16(p + c, mask, (__m256i)_mm512_cvtneps_pbh(e));
                }
                if (length % 2) p[length] = 0;
            }
            pairs_of(vh, dim, length, 1, strides[8], values.data());
            const Output to_out{out + (b * length * heads + h) * dim, 1, nullptr, 0, nullptr, nullptr, dim, heads * dim};
            for (int64_t p = 0; p < panels(dim); ++p)
                one_panel<Bf16>(reinterpret_cast<const uint32_t*>(probabilities.data()), length, length_even / 2,
                                values.data(), to_out, p, sums.data());
        }
    }
}
