// Small kernels for a decoding step on the CPU (models/layers.py), where torch's operators spend
// most of each call on setting up rather than on the few thousand values a step has per call. Each
// serves bfloat16 and float32 values (T: uint16_t or float); the arithmetic is float32 in both.
//
// Softmax attention of one query per row over a key/value cache: torch's fused kernels, tiled for
// many queries, take about 150-360 us for 32 heads over 65 positions, against a few tens here.
// q [B, H, D], k and v [B, H, L, D] (any batch/head/position strides, D contiguous), of type T;
// the scale already in q; mask: none, boolean (1: may attend) or additive of type T, each with
// batch/head/position strides (0 where broadcast). Scores, softmax and the probabilities' product
// with v in float32; out [B, H, D] of type T (bfloat16 rounded to nearest even).
//
// T5's RMS norm, in one pass where torch takes eight operators (73 norms a Flan-T5 decoding step,
// about 2.8 ms of its 65 in bfloat16): the reference's steps and roundings, the mean of squares
// summed in float32 in another order.
#include <limits>
#include <vector>

#include "bf16.h"

using namespace blip2;

namespace {

inline float value(uint16_t v) { return from_bf16(v); }
inline float value(float v) { return v; }
inline void put(float f, uint16_t& out) { out = to_bf16(f); }
inline void put(float f, float& out) { out = f; }

// f as a T holds it
inline float rounded(float f, uint16_t) { return from_bf16(to_bf16(f)); }
inline float rounded(float f, float) { return f; }

template <typename T>
void single_query_attention(const T* q, const int64_t* q_strides, const T* k, const T* v, const int64_t* kv_strides,
                            int64_t batch, int64_t heads, int64_t length, int64_t dim, const void* mask,
                            int mask_kind, const int64_t* mask_strides, T* out, int threads) {
    // kv_strides: k's and v's batch, head, position strides (elements); q_strides: batch, head
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> query(dim), scores(length), acc(dim);
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < batch * heads; ++bh) {
            const int64_t b = bh / heads, h = bh % heads;
            const T* qr = q + b * q_strides[0] + h * q_strides[1];
            for (int64_t d = 0; d < dim; ++d) query[d] = value(qr[d]);
            const T* kr = k + b * kv_strides[0] + h * kv_strides[1];
            const T* vr = v + b * kv_strides[3] + h * kv_strides[4];
            float largest = -std::numeric_limits<float>::infinity();
            for (int64_t l = 0; l < length; ++l) {
                const T* key = kr + l * kv_strides[2];
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t d = 0; d < dim; ++d) s += query[d] * value(key[d]);
                const int64_t at = b * mask_strides[0] + h * mask_strides[1] + l * mask_strides[2];
                if (mask_kind == 1 && !static_cast<const uint8_t*>(mask)[at]) s = -std::numeric_limits<float>::infinity();
                if (mask_kind == 2) s += value(static_cast<const T*>(mask)[at]);
                scores[l] = s;
                largest = s > largest ? s : largest;
            }
            for (int64_t d = 0; d < dim; ++d) acc[d] = 0.f;
            float total = 0.f;
            if (largest > -std::numeric_limits<float>::infinity()) {
                for (int64_t l = 0; l < length; ++l) {
                    const float p = std::exp(scores[l] - largest);
                    total += p;
                    const T* row = vr + l * kv_strides[5];
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) acc[d] += p * value(row[d]);
                }
            }
            // A row that may attend to nothing gets NaN, as torch's softmax gives it.
            const float inverse = total > 0.f ? 1.f / total : std::numeric_limits<float>::quiet_NaN();
            T* o = out + bh * dim;
            for (int64_t d = 0; d < dim; ++d) put(acc[d] * inverse, o[d]);
        }
    }
}

// out[r] = weight * T(x[r] / sqrt(mean(x[r]^2) + eps)), x, weight and out of type T [rows, dim].
template <typename T>
void rms_norm(const T* x, int64_t rows, int64_t dim, const T* weight, float eps, T* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const T* row = x + r * dim;
        float squares = 0.f;
#pragma omp simd reduction(+ : squares)
        for (int64_t d = 0; d < dim; ++d) squares += value(row[d]) * value(row[d]);
        const float inverse = 1.f / std::sqrt(squares / static_cast<float>(dim) + eps);
        T* o = out + r * dim;
        for (int64_t d = 0; d < dim; ++d) put(value(weight[d]) * rounded(value(row[d]) * inverse, T{}), o[d]);
    }
}

}  // namespace

// bf16: T is bfloat16 (uint16_t), else float; the mask of kind 2 (additive) is of type T too.
extern "C" void blip2_single_query_attention(const void* q, const int64_t* q_strides, const void* k, const void* v,
                                             const int64_t* kv_strides, int64_t batch, int64_t heads, int64_t length,
                                             int64_t dim, const void* mask, int mask_kind, const int64_t* mask_strides,
                                             void* out, int bf16, int threads) {
    if (bf16)
        single_query_attention(static_cast<const uint16_t*>(q), q_strides, static_cast<const uint16_t*>(k),
                               static_cast<const uint16_t*>(v), kv_strides, batch, heads, length, dim, mask, mask_kind,
                               mask_strides, static_cast<uint16_t*>(out), threads);
    else
        single_query_attention(static_cast<const float*>(q), q_strides, static_cast<const float*>(k),
                               static_cast<const float*>(v), kv_strides, batch, heads, length, dim, mask, mask_kind,
                               mask_strides, static_cast<float*>(out), threads);
}

extern "C" void blip2_rms_norm(const void* x, int64_t rows, int64_t dim, const void* weight, float eps, void* out,
                               int bf16, int threads) {
    if (bf16)
        rms_norm(static_cast<const uint16_t*>(x), rows, dim, static_cast<const uint16_t*>(weight), eps,
                 static_cast<uint16_t*>(out), threads);
    else
        rms_norm(static_cast<const float*>(x), rows, dim, static_cast<const float*>(weight), eps,
                 static_cast<float*>(out), threads);
}
