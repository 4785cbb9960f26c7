// Per-element rules of the quantized matmuls (docs/numerics.md "int4 group-wise matmul",
// "4-bit lookup-table matmul", "int8 matmul"), shared by host and device code: the CUDA
// kernels call them, and the kernels' host emulation (csrc/cuda/gemm.cu) runs the very same
// functions on the CPU, where the tests compare it with the CPU ops bit for bit.
// Every float operation here is written out (no contraction: nvcc builds with --fmad=false,
// the host with -ffp-contract=off); FMAs are explicit fmaf calls.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "affine.h"
#include "qk_hd.h"
#include "rounding.h"

namespace qk {
namespace mm {

// ---- exact small-integer conversions without int-to-float instructions ------------------------
// (those run at a quarter of the FMA rate on sm_80 / sm_90 and would bound the GEMV kernels)

QK_HD float float_of_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}
// float(u) for 0 <= u < 2^23: the bits 0x4B000000 | u are 2^23 + u, and subtracting 2^23 is
// exact.
QK_HD float float_of_small_uint(uint32_t u) {
  return float_of_bits(0x4B000000u | u) - 8388608.0f;
}
// float(int8 byte t of a word), exactly: (2^23 + (b + 128)) - (2^23 + 128).
QK_HD float float_of_s8(uint32_t word, int t) {
  return float_of_bits(0x4B000000u | (((word >> (8 * t)) & 0xFFu) ^ 0x80u)) - 8388736.0f;
}

// ---- int4 group-wise (gemm_w4) ---------------------------------------------------------------

// Code c (0..7, in k order) of a packed int4 word: byte c % 4, low nibble for c < 4, high for
// c >= 4 (csrc/cpu/gemm/w4/api.h). The result is the unsigned nibble u = q + 8.
QK_HD uint32_t w4_nibble(uint32_t word, int c) {
  return (word >> (8 * (c & 3) + 4 * (c >> 2))) & 15u;
}
// The four low / high nibbles of a word as bytes: codes 0..3 / 4..7 in k order, ready for a
// 4-way int8 dot product (the nibbles are 0..15, so signed and unsigned bytes agree).
QK_HD uint32_t w4_low_nibbles(uint32_t word) { return word & 0x0F0F0F0Fu; }
QK_HD uint32_t w4_high_nibbles(uint32_t word) { return (word >> 4) & 0x0F0F0F0Fu; }

// zc = 8 + z: what the unsigned nibble u is reduced by (w = (u - zc) * s); z = 0 without
// zero points. A float like the CPU's, so out-of-range zero points behave identically.
QK_HD float w4_code_offset(int32_t z) { return 8.0f + static_cast<float>(z); }
// float(u) - zc, the exact mode's weight factor (the CPU's float(u) - zc: same two values).
QK_HD float w4_weight(uint32_t u, float zc) { return float_of_small_uint(u) - zc; }

// Fast-mode activation quantization of one block of 32 (the CPU's quantize_x): amax over
// the finite values, a NaN/Inf anywhere marks the block bad.
QK_HD float w4_amax_step(float amax, float v, bool* bad) {
  const float a = fabsf(v);
  if (!(a <= FLT_MAX)) *bad = true;
  else if (a > amax) amax = a;
  return amax;
}
// d = amax / 127; a bad block gets NaN (its outputs become NaN), d < FLT_MIN gets 0 (codes 0).
QK_HD float w4_block_scale(float amax, bool bad) {
  const float d = amax / 127.0f;
  if (bad) return NAN;
  return d < FLT_MIN ? 0.0f : d;
}
// Whether a block with scale d has nonzero codes (d NaN or 0: all codes 0).
QK_HD bool w4_block_live(float d) { return d >= FLT_MIN; }
// xq = clamp(rne(x * r), -127, 127) with r = 1 / d.
QK_HD int32_t w4_act_code(float x, float r) {
  float v = nearbyintf(x * r);
  v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
  return static_cast<int32_t>(v);
}
// The block's integer dot product sum (u - zc) * xq from du = sum u * xq and xs = sum xq:
// one FMA, exact while the integers stay below 2^24 (always for in-range zero points).
QK_HD float w4_block_dot(int32_t du, float zc, float xs) {
  return fmaf(-zc, xs, static_cast<float>(du));
}

// ---- 4-bit lookup table (gemm_lut4) ----------------------------------------------------------

// Code j (0..7) of a little-endian 32-bit word of an LSB-first nibble stream.
QK_HD uint32_t lut4_code(uint32_t word, int j) { return (word >> (4 * j)) & 15u; }
// The weight exactly as dequantize_lut: one float32 product.
QK_HD float lut4_weight(const float* table16, uint32_t code, float scale) {
  return table16[code] * scale;
}
QK_HD float add_bias(float acc, const float* bias, int64_t j) {
  return bias ? acc + bias[j] : acc;
}

// ---- int8 weights (gemm_w8a8, gemm_w8a16) ------------------------------------------------------

// Largest K whose int32 accumulation cannot overflow (K * 127 * 128 <= 2^31 - 1).
constexpr int64_t kW8A8MaxK = 132104;

// Per-row activation scale of W8A8: the symmetric absmax rule with qmax = 127.
QK_HD float w8a8_row_scale(float amax) { return sanitize_scale(amax / 127.0f); }
// The activation code, as quantize_affine with codes [-127, 127], nearest-even, mid-tread.
QK_HD int32_t w8a8_act_code(float x, float scale) {
  const AffineSpec spec{-127, 127, kNearestEven, kMidTread, 0.0f, 0};
  return affine_code(x * (1.0f / scale), 0, spec, 0);
}
QK_HD float w8a8_value(int32_t acc, float sx, float sw, const float* bias, int64_t j) {
  const float v = (static_cast<float>(acc) * sx) * sw;
  return bias ? v + bias[j] : v;
}
QK_HD float w8a16_value(float acc, float sw, const float* bias, int64_t j) {
  const float v = acc * sw;
  return bias ? v + bias[j] : v;
}

// Byte t (0..3) of a word as a signed int8 value.
QK_HD int32_t s8_of(uint32_t word, int t) {
  return static_cast<int32_t>(static_cast<int8_t>(static_cast<uint8_t>(word >> (8 * t))));
}

// c + sum_t a.byte[t] * b.byte[t] over signed bytes (dp4a). Exact in int32 for the values
// the kernels feed it.
QK_HD int32_t dot4_s8(uint32_t a, uint32_t b, int32_t c) {
#if defined(__CUDA_ARCH__)
  return __dp4a(static_cast<int>(a), static_cast<int>(b), c);
#else
  for (int t = 0; t < 4; ++t) c += s8_of(a, t) * s8_of(b, t);
  return c;
#endif
}

}  // namespace mm
}  // namespace qk
