// Codebook (lookup-table) quantization of one value: find the two adjacent table values that
// bracket t and choose by rounding mode (docs/numerics.md). Sign-magnitude formats search the
// magnitude table and set the sign bit; other formats search one ascending signed table.
#pragma once
#include <cmath>
#include <cstdint>
#include "qk_hd.h"
#include "rounding.h"

namespace qk {

struct CodebookSpec {
  const float* values;   // ascending; magnitudes (>= 0) when sign_bit != 0
  const uint8_t* codes;  // code of each value
  int n;                 // number of values (2..256)
  int sign_bit;          // e.g. 0x8 for fp4, 0x80 for fp8; 0 = not sign-magnitude
  int rounding;
  uint64_t seed;
};

// Index of the last table value <= t, or -1 if t is below the table. Binary search: the
// tables are at most 256 long and this is the reference path; fast paths use their own.
QK_HD int bracket_lo(const float* v, int n, float t) {
  int lo = -1, hi = n;  // invariant: v[lo] <= t < v[hi]
  while (hi - lo > 1) {
    int mid = (lo + hi) >> 1;
    if (v[mid] <= t) lo = mid; else hi = mid;
  }
  return lo;
}

// Chooses between table entries i (value lo) and i+1 (value hi), lo < t < hi.
// `up_on_tie`: 1 choose hi on ties, 0 choose lo, -1 decide by even code.
QK_HD int pick_nearest(const CodebookSpec& s, int i, float t, int up_on_tie) {
  float dlo = t - s.values[i];
  float dhi = s.values[i + 1] - t;
  if (dlo < dhi) return i;
  if (dhi < dlo) return i + 1;
  if (up_on_tie >= 0) return i + up_on_tie;
  return (s.codes[i] & 1) ? i + 1 : i;
}

// Position in the table for t (non-negative when sign-magnitude) under `mode`.
// `toward_hi_is_up`: whether moving to the larger table entry moves the value up (false for
// the magnitude of a negative t, which mirrors floor/ceil/half_up).
QK_HD int codebook_index(const CodebookSpec& s, float t, int mode, bool toward_hi_is_up,
                         uint64_t index) {
  int i = bracket_lo(s.values, s.n, t);
  if (i < 0) return 0;
  if (i >= s.n - 1 || s.values[i] == t) return i;
  switch (mode) {
    case kNearestEven: return pick_nearest(s, i, t, -1);
    case kHalfAway: return pick_nearest(s, i, t, s.sign_bit ? 1 : (t >= 0.0f ? 1 : 0));
    case kHalfUp: return pick_nearest(s, i, t, toward_hi_is_up ? 1 : 0);
    case kFloor: return toward_hi_is_up ? i : i + 1;
    case kCeil: return toward_hi_is_up ? i + 1 : i;
    case kTrunc: return s.sign_bit ? i : (t >= 0.0f ? i : i + 1);
    case kAway: return s.sign_bit ? i + 1 : (t >= 0.0f ? i + 1 : i);
    default: {  // kStochastic
      float p = (t - s.values[i]) / (s.values[i + 1] - s.values[i]);
      return uniform01(s.seed, index) < p ? i + 1 : i;
    }
  }
}

QK_HD bool sign_bit_set(float t) {
#if defined(__CUDA_ARCH__)
  return signbit(t);
#else
  return std::signbit(t);
#endif
}

QK_HD uint8_t codebook_code(float t, const CodebookSpec& s, uint64_t index) {
  if (s.sign_bit) {
    bool neg = sign_bit_set(t);
    int i = codebook_index(s, fabsf(t), s.rounding, !neg, index);
    return static_cast<uint8_t>(s.codes[i] | (neg ? s.sign_bit : 0));
  }
  return s.codes[codebook_index(s, t, s.rounding, true, index)];
}

}  // namespace qk
