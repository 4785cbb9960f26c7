// int8-weight matmuls (docs/numerics.md, "int8 matmul"): W8A8 with activations quantized per
// row on the fly, and W8A16 weight-only (float activations). Torch-free, like kernels.h.
//
// Packed weight layout: the (N, K) int8 codes are cut into blocks of kW8BlockN = 16 output
// channels (N padded to Np, a multiple of 16) and K is padded to Kp, a multiple of 4; padding
// codes are 0. Block b is 16 * Kp contiguous bytes; inside it, step s (k = 4s .. 4s+3) is 64
// bytes holding column j's four codes at bytes 4j .. 4j+3:
//     packed[b * 16 * Kp + s * 64 + j * 4 + t] = codes[16 b + j][4 s + t]
// So one 32-byte load is 8 columns x 4 consecutive k, the operand of an int8 dot-product step.
#pragma once
#include <cstdint>

namespace qk {

constexpr int64_t kW8BlockN = 16;
inline int64_t w8_padded_n(int64_t n) { return (n + 15) / 16 * 16; }
inline int64_t w8_padded_k(int64_t k) { return (k + 3) / 4 * 4; }
inline int64_t w8_packed_nbytes(int64_t n, int64_t k) { return w8_padded_n(n) * w8_padded_k(k); }

// Largest K whose int32 accumulation cannot overflow: K * 127 * 128 <= 2^31 - 1.
constexpr int64_t kW8A8MaxK = 132104;

// codes: (n, k) row-major int8, any value in [-128, 127].
void pack_w8(const int8_t* codes, int64_t n, int64_t k, int8_t* packed);
void unpack_w8(const int8_t* packed, int64_t n, int64_t k, int8_t* codes);

// acc[m][n] = sum_k xq[m][k] * w[n][k] in int32 (exact for k <= kW8A8MaxK). xq: (m, k) row-major
// codes in [-127, 127] (-128 is not allowed: the AVX2 kernel negates activation codes); the
// call works on an aligned, padded copy of them (the kernels' layout), so xq needs no spare bytes.
void gemm_s8s8_s32(const int8_t* xq, int64_t m, const int8_t* packed, int64_t n, int64_t k,
                   int32_t* acc);

// W8A8: each row of x (m, k) is quantized to int8 (scale = amax / 127, codes [-127, 127],
// round-nearest-even), then y[m][n] = (float(acc) * sx[m]) * w_scale[n] (+ bias[n]).
// Returns true (y unspecified) when x holds NaN or Inf.
bool gemm_w8a8(const float* x, int64_t m, const int8_t* packed, const float* w_scale,
               const float* bias, int64_t n, int64_t k, float* y);

// W8A16: y[m][n] = (sum_k x[m][k] * float(w[n][k])) * w_scale[n] (+ bias[n]), the sum in
// float32 (FMA, path-dependent order; see docs/numerics.md for the bound).
void gemm_w8a16(const float* x, int64_t m, const int8_t* packed, const float* w_scale,
                const float* bias, int64_t n, int64_t k, float* y);

}  // namespace qk
