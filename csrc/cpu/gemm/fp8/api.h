// FP8-weight matmul on the CPU: y (M, N) float32 = x (M, K) @ W^T (+ bias), W (N, K) stored as
// one byte per weight, an OCP FP8 bit pattern (E4M3 "fn" or E5M2), with one float32 scale per
// output row (group == K) or per group of `group` consecutive elements along K.
//
// Layout: plain row-major bytes, w[n * K + k] (what qkern.quantize gives as codes); scales
// s[n * (K / group) + k / group]. The weight the definition multiplies by is
//     w[n][k] = fp8_value(code, fmt) * s          (one float32 product, as qkern's dequantize)
// docs/numerics.md "FP8 matmul" gives the summation orders and error bounds.
//
// Decoding (every path, bit for bit): E5M2 is the top byte of an IEEE binary16, so
// half(code << 8) is its value; for E4M3, half((code & 0x80) << 8 | (code & 0x7f) << 7) is
// value * 2^-8 for normals and subnormals alike (binary16's exponent bias is E4M3's plus 8,
// and its subnormal range starts 8 binades lower). The AVX2 kernels decode with vcvtph2ps that way. NaN / Inf
// codes, which qkern's quantizer never produces (it saturates) and pack_weight rejects, decode
// as their bit pattern says: E5M2 0x7c/0xfc = +-Inf, 0x7d-0x7f/0xfd-0xff = NaN; E4M3 0x7f/0xff
// (its only NaN) reads as +-480, the value the pattern would have as a normal number.
#pragma once
#include <cstdint>
#include <cstring>

namespace qk {

enum Fp8Format : int { kFp8E4M3 = 0, kFp8E5M2 = 1 };

// binary16 bits -> float32 (exact; the scalar twin of vcvtph2ps).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 31u, m = h & 0x3ffu;
  uint32_t bits;
  if (e == 31) {
    bits = sign | 0x7f800000u | (m << 13);
  } else if (e != 0) {
    bits = sign | ((e + 112) << 23) | (m << 13);
  } else if (m == 0) {
    bits = sign;
  } else {  // subnormal half: normalize
    int sh = 0;
    uint32_t mm = m;
    while (!(mm & 0x400u)) {
      mm <<= 1;
      ++sh;
    }
    bits = sign | ((113u - sh) << 23) | ((mm & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The binary16 bits the kernels convert for one code: value(code) * 2^-8 (E4M3) or value (E5M2).
inline uint16_t fp8_half_bits(uint8_t c, int fmt) {
  if (fmt == kFp8E5M2) return static_cast<uint16_t>(c << 8);
  return static_cast<uint16_t>((c & 0x80u) << 8 | (c & 0x7fu) << 7);
}

// The value of one code (see the header comment for NaN / Inf codes).
inline float fp8_value(uint8_t c, int fmt) {
  const float h = half_bits_to_float(fp8_half_bits(c, fmt));
  return fmt == kFp8E5M2 ? h : h * 256.0f;
}

// group: K (per output channel) or a positive multiple of 16 dividing K. bias may be null.
// Runs on the thread pool, on the active ISA (qk::set_isa).
void gemm_fp8(const float* x, int64_t m, const uint8_t* w, const float* scales,
              const float* bias, int64_t n, int64_t k, int64_t group, int fmt, float* y);

// Rows [n0, n1) of W decoded as the definition has them, out[(r - n0) * k + c] =
// fp8_value(code, fmt) * s (one float32 product); w / scales are the whole layer's, group the
// effective group (K for per channel). For a GEMM by chunks (python/qkern/ops/fp8.py, many
// rows of x). Threaded.
void fp8_decode(const uint8_t* w, const float* scales, int64_t n0, int64_t n1, int64_t k,
                int64_t group, int fmt, float* out);

}  // namespace qk
