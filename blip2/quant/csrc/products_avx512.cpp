// Linear layers' products for CPUs with AVX-512 BF16 and VNNI (quant/cpu_kernels.py, quant/packed.py,
// quant/linear.py): y = x w^T (+ b) for any number of rows, on a weight laid out once, at load, in
// pairs of inputs for 16 outputs (the layout and the register tiles: blip2/csrc/pairs_avx512.h).
#include "bf16.h"
#include "pairs_avx512.h"

using namespace blip2;

// y[m, n] = x[m, k] w[n, k]^T + bias[n], bfloat16 in and out (float32 sums, rounded to nearest even);
// k even (the caller pads x), w in the layout above, bias bfloat16 or null.
extern "C" void blip2_bf16_mm(const uint16_t* x, int64_t m, int64_t k, const uint16_t* w, const uint16_t* bias,
                              int64_t n, uint16_t* y, int threads) {
    const Output out{y, 1, bias, 1, nullptr, nullptr, n};
    product<Bf16>(reinterpret_cast<const uint32_t*>(x), m, k / 2, w, out, threads);
}

// y[m, n] = (x[m, k] w[n, k]^T) * scales[n] + bias[n] for int8 w in the layout above (k_even = its
// padded k), x bfloat16 or float32 (x_bf16), quantized here to 16 bits a row; y bfloat16 or float32
// (y_bf16); bias bfloat16 or float32 (bias_bf16) or null. scratch: m * (k_even / 2 + 1) 32-bit words.
extern "C" void blip2_int8_pairs_mm(const void* x, int x_bf16, int64_t m, int64_t k, int64_t k_even, const int8_t* w,
                              const float* scales, const void* bias, int bias_bf16, int64_t n, void* y, int y_bf16,
                              uint32_t* scratch, int threads) {
    const float* row_scales = quantize_pair_rows(x, x_bf16, m, k, k_even, scratch, threads);
    const Output out{y, y_bf16, bias, bias_bf16, row_scales, scales, n};
    product<Int8>(scratch, m, k_even / 2, w, out, threads);
}
