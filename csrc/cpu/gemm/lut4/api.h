// Fused lookup-table matmul for 4-bit codebook weights (nf4, fp4_e2m1, fp4_bnb, any 16-entry
// table):  y[m][n] = sum_k x[m][k] * w[n][k] (+ bias[n]),  w[n][k] = table[c[n][k]] * s[n][k/G].
//
// Packed layout (`packed`, N * K/2 bytes): each row of W is its own LSB-first nibble stream,
// element k of row n in byte n*K/2 + k/2, low nibble for even k, high nibble for odd k (the
// same bytes as qk::pack_bits(codes, 4, msb=false) row by row). Eight consecutive codes are
// one little-endian 32-bit word, so the AVX2 decoder broadcasts a word and shifts each lane
// to its own nibble (no byte shuffles, no widening conversions). Scales: float32 (N, K/G).
//
// Numerics: every weight is decoded exactly as dequantize_lut does (float32 table[c] * s);
// the products x * w are accumulated in float32. The scalar kernel sums in k order without
// FMA; the AVX2 kernel uses FMA and 8-lane (plus k-chunk) partial sums, so the two agree to
// float32 accumulation error (|err| <~ K * 2^-24 * sum_k |x w|), not bit for bit.
//
// Double-quantized scales (gemm_lut4_dq): instead of float32 scales, one int8 code per block
// (block b = n * K/G + g, row-major) plus a float32 second-level scale per dq_group blocks and
// a float32 mean. Each task rebuilds the scales of its rows (a few thousand blocks at a time,
// into an L1-sized buffer) as qkern's double_quantize_scales dequantizes them
// (lut4_dq_scale), then runs the float-scale kernel on them: the weights are the same bits, for
// 1 byte of scale storage per block instead of 4.
#pragma once
#include <cstdint>

namespace qk {

// K % group == 0, group % 8 == 0 (32, 64 and 128 are the supported sizes); bias may be null.
// Runs on the thread pool, on the active ISA (qk::set_isa).
void gemm_lut4(const float* x, int64_t m, const uint8_t* packed, const float* scales,
               const float* table16, const float* bias, int64_t n, int64_t k, int64_t group,
               float* y);

// qscales (n * k/group int8), scale2 (ceil(n * k/group / dq_group) float32), mean: see above.
void gemm_lut4_dq(const float* x, int64_t m, const uint8_t* packed, const int8_t* qscales,
                  const float* scale2, float mean, int64_t dq_group, const float* table16,
                  const float* bias, int64_t n, int64_t k, int64_t group, float* y);

// Rows [n0, n1) of W decoded as the kernels decode them, w[(r - n0) * k + c] = table16[code] *
// s (one float32 product; bits equal to dequantize_lut's); packed, scales / qscales are the
// whole layer's (row 0 first). scales null: the double-quantized scales (qscales, scale2,
// mean, dq_group as gemm_lut4_dq), rebuilt with the kernels' rule. For a GEMM by chunks
// (python/qkern/ops/lut4.py, many rows of x). Threaded.
void lut4_decode(const uint8_t* packed, const float* scales, const int8_t* qscales,
                 const float* scale2, float mean, int64_t dq_group, const float* table16,
                 int64_t n0, int64_t n1, int64_t k, int64_t group, float* w);

}  // namespace qk
