// Small kernels for a decoding step on the CPU (models/layers.py), where torch's operators spend
// most of each call on setting up rather than on the few thousand values a step has per call.
//
// Softmax attention of one query per row over a key/value cache: torch's fused kernels, tiled for
// many queries, take about 150-360 us for 32 heads over 65 positions, against a few tens here.
// q [B, H, D], k and v [B, H, L, D] (any batch/head/position strides, D contiguous), bfloat16;
// the scale already in q; mask: none, boolean (1: may attend) or additive bfloat16, each with
// batch/head/position strides (0 where broadcast). Scores and softmax in float32, the probabilities
// kept in float32 for the product with v; out [B, H, D] bfloat16, rounded to nearest even.
//
// T5's RMS norm of bfloat16 rows, in one pass where torch takes eight operators (73 norms a Flan-T5
// decoding step, about 2.8 ms of its 65): the reference's steps and roundings, the mean of squares
// summed in float32 in another order.
#include <limits>
#include <vector>

#include "bf16.h"

using namespace blip2;

extern "C" void blip2_single_query_attention(const uint16_t* q, const int64_t* q_strides, const uint16_t* k,
                                             const uint16_t* v, const int64_t* kv_strides, int64_t batch,
                                             int64_t heads, int64_t length, int64_t dim, const void* mask,
                                             int mask_kind, const int64_t* mask_strides, uint16_t* out,
                                             int threads) {
    // kv_strides: k's and v's batch, head, position strides (elements); q_strides: batch, head
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> query(dim), scores(length), acc(dim);
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < batch * heads; ++bh) {
            const int64_t b = bh / heads, h = bh % heads;
            const uint16_t* qr = q + b * q_strides[0] + h * q_strides[1];
            for (int64_t d = 0; d < dim; ++d) query[d] = from_bf16(qr[d]);
            const uint16_t* kr = k + b * kv_strides[0] + h * kv_strides[1];
            const uint16_t* vr = v + b * kv_strides[3] + h * kv_strides[4];
            float largest = -std::numeric_limits<float>::infinity();
            for (int64_t l = 0; l < length; ++l) {
                const uint16_t* key = kr + l * kv_strides[2];
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t d = 0; d < dim; ++d) s += query[d] * from_bf16(key[d]);
                const int64_t at = b * mask_strides[0] + h * mask_strides[1] + l * mask_strides[2];
                if (mask_kind == 1 && !static_cast<const uint8_t*>(mask)[at]) s = -std::numeric_limits<float>::infinity();
                if (mask_kind == 2) s += from_bf16(static_cast<const uint16_t*>(mask)[at]);
                scores[l] = s;
                largest = s > largest ? s : largest;
            }
            for (int64_t d = 0; d < dim; ++d) acc[d] = 0.f;
            float total = 0.f;
            if (largest > -std::numeric_limits<float>::infinity()) {
                for (int64_t l = 0; l < length; ++l) {
                    const float p = std::exp(scores[l] - largest);
                    total += p;
                    const uint16_t* value = vr + l * kv_strides[5];
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) acc[d] += p * from_bf16(value[d]);
                }
            }
            // A row that may attend to nothing gets NaN, as torch's softmax gives it.
            const float inverse = total > 0.f ? 1.f / total : std::numeric_limits<float>::quiet_NaN();
            uint16_t* o = out + bh * dim;
            for (int64_t d = 0; d < dim; ++d) o[d] = to_bf16(acc[d] * inverse);
        }
    }
}

// out[r] = bf16(weight * bf16(x[r] / sqrt(mean(x[r]^2) + eps))), x, weight and out bfloat16 [rows, dim].
extern "C" void blip2_rms_norm(const uint16_t* x, int64_t rows, int64_t dim, const uint16_t* weight, float eps,
                               uint16_t* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t* row = x + r * dim;
        float squares = 0.f;
#pragma omp simd reduction(+ : squares)
        for (int64_t d = 0; d < dim; ++d) squares += from_bf16(row[d]) * from_bf16(row[d]);
        const float inverse = 1.f / std::sqrt(squares / static_cast<float>(dim) + eps);
        uint16_t* o = out + r * dim;
        for (int64_t d = 0; d < dim; ++d)
            o[d] = to_bf16(from_bf16(weight[d]) * from_bf16(to_bf16(from_bf16(row[d]) * inverse)));
    }
}
