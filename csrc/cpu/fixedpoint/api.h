// Fixed-point requantization (gemmlowp / TFLite style): an int32 accumulator times a real
// multiplier M = m0 * 2^(shift - 31) (m0 an int32 in [2^30, 2^31) from QuantizeMultiplier, or 0),
// computed with integers only, then + zero point and clamped to [qmin, qmax] (a folded ReLU).
//
// The element rule is gemmlowp's fixedpoint.h (SaturatingRoundingDoublingHighMul,
// RoundingDivideByPOT) composed as TFLite's MultiplyByQuantizedMultiplier
// (tensorflow/lite/kernels/internal/common.h, the double-rounding variant):
//   left = max(shift, 0), right = max(-shift, 0)
//   y = RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x * 2^left, m0), right)
// with one definition where TFLite's C++ has undefined behaviour: x * 2^left saturates to int32.
// shift is in [-31, 30] (requant_shift_ok). The scalar functions below are the definition; the
// AVX2 and AVX-512 paths compute the same integers (bit-identical). Torch-free.
#pragma once
#include <cstdint>
#include <limits>

namespace qk {

constexpr int32_t kInt32Min = std::numeric_limits<int32_t>::min();
constexpr int32_t kInt32Max = std::numeric_limits<int32_t>::max();

inline bool requant_shift_ok(int64_t shift) { return shift >= -31 && shift <= 30; }

// gemmlowp SaturatingRoundingDoublingHighMul: (a * b * 2 + 2^31 nudge) >> 32 with the nudge's
// sign following a * b, division truncating; INT32_MIN * INT32_MIN saturates to INT32_MAX.
inline int32_t srdhm(int32_t a, int32_t b) {
  const bool overflow = a == b && a == kInt32Min;
  const int64_t ab = static_cast<int64_t>(a) * static_cast<int64_t>(b);
  const int32_t nudge = ab >= 0 ? (1 << 30) : (1 - (1 << 30));
  const int32_t hi = static_cast<int32_t>((ab + nudge) / (int64_t{1} << 31));
  return overflow ? kInt32Max : hi;
}

// gemmlowp RoundingDivideByPOT: x / 2^exponent rounded to nearest, ties away from zero;
// exponent in [0, 31].
inline int32_t rounding_divide_by_pot(int32_t x, int exponent) {
  const int32_t mask = static_cast<int32_t>((int64_t{1} << exponent) - 1);
  const int32_t remainder = x & mask;
  const int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
  return (x >> exponent) + (remainder > threshold ? 1 : 0);
}

// x * 2^s saturated to int32, s in [0, 30].
inline int32_t saturating_shl(int32_t x, int s) {
  const int64_t v = static_cast<int64_t>(x) * (int64_t{1} << s);
  return v > kInt32Max ? kInt32Max : v < kInt32Min ? kInt32Min : static_cast<int32_t>(v);
}

// TFLite MultiplyByQuantizedMultiplier (see above); shift in [-31, 30].
inline int32_t multiply_by_quantized_multiplier(int32_t x, int32_t m0, int shift) {
  const int left = shift > 0 ? shift : 0, right = shift > 0 ? 0 : -shift;
  return rounding_divide_by_pot(srdhm(saturating_shl(x, left), m0), right);
}

// The requantization parameters of one call: per-channel (m0[c], shift[c] for the channel c =
// the index along the last dimension) or per-tensor (m0[0], shift[0]); the output is
// clamp(multiply_by_quantized_multiplier(acc, m0, shift) + zero_point, qmin, qmax), computed
// without int32 overflow (qmin <= qmax; the result fits the output type).
struct Requant {
  const int32_t* m0;
  const int32_t* shift;  // each in [-31, 30]
  bool per_channel;
  int32_t zero_point, qmin, qmax;
};

// acc: (rows, channels) row-major int32; out: the same shape, int8 (qmin, qmax in [-128, 127])
// or int32. Spread over the thread pool; results do not depend on the thread count or ISA.
void requantize_s32_s8(const int32_t* acc, int64_t rows, int64_t channels, const Requant& q,
                       int8_t* out);
void requantize_s32_s32(const int32_t* acc, int64_t rows, int64_t channels, const Requant& q,
                        int32_t* out);

}  // namespace qk
