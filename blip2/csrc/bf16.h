// Scalar helpers every kernel shares (blip2/native.py puts this directory on the include path and
// hashes its headers into each library's cache key).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace blip2 {

inline float from_bf16(uint16_t v) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Rounded to nearest even, as torch rounds; a NaN stays a NaN.
inline uint16_t to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7F800000u) == 0x7F800000u) return static_cast<uint16_t>((u >> 16) | ((u & 0xFFFF) ? 0x40 : 0));
    u += 0x7FFFu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

inline float as_float(float v) { return v; }

// Each row of x (bfloat16 through from_bf16, or float32 through as_float; k values) to integers Q in
// [-limit, limit] by its largest magnitude, over k_padded values (zeros after k), with its scale
// (largest / limit; 1 for a row of zeros).
template <typename Q, typename T, float (*load)(T)>
void quantize_rows(const T* x, int64_t rows, int64_t k, int64_t k_padded, Q* q, float* scales, float limit,
                   int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const T* row = x + r * k;
        float largest = 0.f;
#pragma omp simd reduction(max : largest)
        for (int64_t c = 0; c < k; ++c) largest = std::max(largest, std::fabs(load(row[c])));
        const float scale = largest > 0.f ? largest / limit : 1.f, inverse = 1.f / scale;
        scales[r] = scale;
        Q* out = q + r * k_padded;
#pragma omp simd
        for (int64_t c = 0; c < k; ++c)
            out[c] = static_cast<Q>(std::min(limit, std::max(-limit, std::nearbyint(load(row[c]) * inverse))));
        for (int64_t c = k; c < k_padded; ++c) out[c] = 0;
    }
}

// The int8 products' activations (blip2_int8_pairs_mm, in products_avx2.cpp and products_avx512.cpp):
// x [m, k] (bfloat16 if x_bf16, else float32) to 16-bit integers in steps of each row's largest / 32767,
// written to scratch as m rows of k_even values (pairs of inputs, a 32-bit word each), followed by the
// m row scales, which are returned.
inline float* quantize_pair_rows(const void* x, int x_bf16, int64_t m, int64_t k, int64_t k_even, uint32_t* scratch,
                                 int threads) {
    auto* q = reinterpret_cast<int16_t*>(scratch);
    auto* scales = reinterpret_cast<float*>(scratch + m * (k_even / 2));
    if (x_bf16)
        quantize_rows<int16_t, uint16_t, from_bf16>(static_cast<const uint16_t*>(x), m, k, k_even, q, scales, 32767.f,
                                                   threads);
    else
        quantize_rows<int16_t, float, as_float>(static_cast<const float*>(x), m, k, k_even, q, scales, 32767.f, threads);
    return scales;
}

}  // namespace blip2
