// Rounding modes and the counter-based RNG of docs/numerics.md. Written with exact float32
// operations only (v - floor(v) is exact for |v| < 2^23, larger floats are integers), so the
// scalar, AVX2 and CUDA paths agree bit for bit.
#pragma once
#include <cmath>
#include <cstdint>
#include "qk_hd.h"

namespace qk {

enum Rounding : int {
  kNearestEven = 0,
  kHalfAway = 1,
  kHalfUp = 2,
  kFloor = 3,
  kCeil = 4,
  kTrunc = 5,
  kStochastic = 6,
  kAway = 7,  // directed away from zero: 1.2 -> 2, -1.2 -> -2 (integers stay)
};
constexpr int kNumRoundings = 8;

QK_HD uint64_t mix64(uint64_t seed, uint64_t index) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (index + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Uniform in [0, 1) with 24 random bits: exactly representable in float32.
QK_HD float uniform01(uint64_t seed, uint64_t index) {
  return static_cast<float>(mix64(seed, index) >> 40) * 5.9604644775390625e-8f;
}

// Round v to an integer-valued float. `index`/`seed` feed the stochastic mode only.
QK_HD float round_mode(float v, int mode, uint64_t seed, uint64_t index) {
  switch (mode) {
    case kNearestEven:
      return nearbyintf(v);  // default FP environment: ties to even
    case kHalfAway: {
      float r = truncf(v);
      float d = v - r;  // exact
      if (d >= 0.5f) r += 1.0f;
      else if (d <= -0.5f) r -= 1.0f;
      return r;
    }
    case kHalfUp: {
      float r = floorf(v);
      return (v - r >= 0.5f) ? r + 1.0f : r;
    }
    case kFloor:
      return floorf(v);
    case kCeil:
      return ceilf(v);
    case kTrunc:
      return truncf(v);
    case kAway:
      return v >= 0.0f ? ceilf(v) : floorf(v);
    default: {  // kStochastic
      float r = floorf(v);
      return (uniform01(seed, index) < v - r) ? r + 1.0f : r;
    }
  }
}

}  // namespace qk
