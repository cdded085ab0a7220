// Dynamic int8 activations for many-row products on CPUs with AVX-512 VNNI (quant/cpu_kernels.py):
// each row of the activations quantized to int8 by its largest magnitude, the int32 products
// (torch._int_mm) scaled back by row and column scales with the bias, in one pass each.
#include "bf16.h"

using namespace blip2;

extern "C" void blip2_quantize_rows(const void* x, int bf16, int64_t rows, int64_t cols, int8_t* q, float* scales,
                                    int threads) {
    if (bf16)
        quantize_rows<int8_t, uint16_t, from_bf16>(static_cast<const uint16_t*>(x), rows, cols, cols, q, scales, 127.f,
                                                   threads);
    else
        quantize_rows<int8_t, float, as_float>(static_cast<const float*>(x), rows, cols, cols, q, scales, 127.f, threads);
}

template <typename B>
static inline float bias_at(const B* bias, int64_t n);
template <>
inline float bias_at<float>(const float* bias, int64_t n) { return bias ? bias[n] : 0.f; }
template <>
inline float bias_at<uint16_t>(const uint16_t* bias, int64_t n) { return bias ? from_bf16(bias[n]) : 0.f; }

template <typename B>
static void scale_rows(const int32_t* acc, int64_t rows, int64_t cols, const float* row_scales,
                       const float* col_scales, const B* bias, void* out, int bf16, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < rows; ++m) {
        const int32_t* a = acc + m * cols;
        const float s = row_scales[m];
        if (bf16) {
            uint16_t* o = static_cast<uint16_t*>(out) + m * cols;
#pragma omp simd
            for (int64_t n = 0; n < cols; ++n)
                o[n] = to_bf16(static_cast<float>(a[n]) * s * col_scales[n] + bias_at(bias, n));
        } else {
            float* o = static_cast<float*>(out) + m * cols;
#pragma omp simd
            for (int64_t n = 0; n < cols; ++n)
                o[n] = static_cast<float>(a[n]) * s * col_scales[n] + bias_at(bias, n);
        }
    }
}

// out[m, n] = acc[m, n] * row_scales[m] * col_scales[n] + bias[n] (bias bfloat16 or float32, or null),
// as bfloat16 or float32.
extern "C" void blip2_scale_rows(const int32_t* acc, int64_t rows, int64_t cols, const float* row_scales,
                                 const float* col_scales, const void* bias, int bias_bf16, void* out, int bf16,
                                 int threads) {
    if (bias_bf16)
        scale_rows(acc, rows, cols, row_scales, col_scales, static_cast<const uint16_t*>(bias), out, bf16, threads);
    else
        scale_rows(acc, rows, cols, row_scales, col_scales, static_cast<const float*>(bias), out, bf16, threads);
}
