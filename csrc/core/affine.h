// Uniform (affine) quantization of one value: mid-tread, mid-rise and dead-zone quantizers
// (docs/numerics.md). Clamping is done on floats before the integer conversion so that any
// finite input saturates instead of overflowing.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include "qk_hd.h"
#include "rounding.h"

namespace qk {

enum QuantizerShape : int { kMidTread = 0, kMidRise = 1, kDeadZone = 2 };

enum ScaleRule : int {
  kScaleAbsMax = 0,   // amax / qpos (symmetric) or (hi - lo) / (qmax - qmin) (asymmetric)
  kScaleMinMax = 1,   // asymmetric min/max with zero point
  kScalePow2MX = 2,   // 2^(floor(log2 amax) - emax), OCP MX
  kScaleMeanAbs = 3,  // mean |x| (XNOR-Net alpha)
};

struct AffineSpec {
  int32_t qmin;
  int32_t qmax;
  int rounding;
  int shape;
  float deadzone_half;  // (w - 1) / 2 for the dead-zone quantizer
  uint64_t seed;
};

// NaN goes to lo, so a float-to-int conversion after it is always defined (NaN input is
// reported by the kernels separately).
QK_HD float clampf(float v, float lo, float hi) { return v >= lo ? (v <= hi ? v : hi) : lo; }

// t = x / scale already computed; returns the code (zp included) as an integer.
QK_HD int32_t affine_code(float t, int32_t zp, const AffineSpec& s, uint64_t index) {
  float q;
  if (s.shape == kMidRise) {
    q = round_mode(t - 0.5f, s.rounding, s.seed, index);
  } else if (s.shape == kDeadZone) {
    float a = fabsf(t) - s.deadzone_half;
    float r = round_mode(a, s.rounding, s.seed, index);
    r = r > 0.0f ? r : 0.0f;
    q = t < 0.0f ? -r : r;
  } else {
    q = round_mode(t, s.rounding, s.seed, index);
  }
  q = clampf(q, static_cast<float>(s.qmin - zp), static_cast<float>(s.qmax - zp));
  return static_cast<int32_t>(q) + zp;
}

QK_HD float affine_value(int32_t code, int32_t zp, float offset, float scale) {
  return (static_cast<float>(code - zp) + offset) * scale;
}

// Guards against zero and subnormal scales (docs/numerics.md, "degenerate groups").
QK_HD float sanitize_scale(float scale) {
  if (!(scale > 0.0f)) return 1.0f;
  return scale < FLT_MIN ? FLT_MIN : scale;
}

// floor(log2(a)) for finite a > 0, exact (frexp gives a = m * 2^e, m in [0.5, 1)).
QK_HD int floor_log2(float a) {
  int e;
  frexpf(a, &e);
  return e - 1;
}

QK_HD float pow2_mx_scale(float amax, int emax) {
  if (!(amax > 0.0f)) return ldexpf(1.0f, -127);
  int e = floor_log2(amax) - emax;
  e = e < -127 ? -127 : (e > 127 ? 127 : e);
  return ldexpf(1.0f, e);
}

// (hi - lo) / n for lo <= 0 <= hi, n = qmax - qmin. When hi - lo overflows float32 (finite
// hi and lo beyond FLT_MAX / 2 in magnitude) the same quotient is taken from the halves: hi/2,
// lo/2 and n/2 are exact and rounding commutes with halving, so (hi/2 - lo/2) / (n/2) is
// float32((hi - lo) / n) computed without the overflow, bit for bit (docs/numerics.md, "range
// overflow"). Ordinary ranges take the first branch: unchanged bits.
QK_HD float minmax_scale(float lo, float hi, int32_t n) {
  const float nf = static_cast<float>(n);
  const float range = hi - lo;
  if (range <= FLT_MAX) return range / nf;
  return (hi * 0.5f - lo * 0.5f) / (nf * 0.5f);
}

// Scale (and zero point) of one group from its statistics.
QK_HD void affine_params_from_stats(float lo, float hi, float amax, double sum_abs, int64_t n,
                                    int rule, float qpos, int emax, const AffineSpec& s,
                                    float* scale, int32_t* zp) {
  if (rule == kScaleMinMax) {
    lo = lo < 0.0f ? lo : 0.0f;
    hi = hi > 0.0f ? hi : 0.0f;
    float sc = sanitize_scale(minmax_scale(lo, hi, s.qmax - s.qmin));
    float z = static_cast<float>(s.qmin) - nearbyintf(lo / sc);
    z = clampf(z, static_cast<float>(s.qmin), static_cast<float>(s.qmax));
    *scale = sc;
    *zp = static_cast<int32_t>(z);
    return;
  }
  *zp = 0;
  if (rule == kScalePow2MX) {
    *scale = pow2_mx_scale(amax, emax);
  } else if (rule == kScaleMeanAbs) {
    *scale = sanitize_scale(static_cast<float>(sum_abs / static_cast<double>(n)));
  } else {
    *scale = sanitize_scale(amax / qpos);
  }
}

}  // namespace qk
