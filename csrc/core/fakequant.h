// Fake quantization with a learned step size (LSQ, Esser et al. 2020; LSQ+'s learned offset,
// Bhalgat et al. 2020), one element at a time, shared by every backend (QK_HD):
//
//   t = (x - beta) * inv,  inv = 1 / s (float32, one division per scale),
//   y = round(clamp(t, -Q_N, Q_P)) * s (+ beta when there is an offset),
//
// round = half to even. Backward, with the straight-through estimator for round: the element
// is inside when -Q_N <= t <= Q_P (bounds included, as torch.clamp's gradient, so the
// autograd formula of observers/lsq.py gives the same masks), below when t < -Q_N, above when
// t > Q_P; NaN t is none of the three (y NaN, grad_x 0, its d/ds term NaN).
//   grad_x = grad_y inside, 0 elsewhere;
//   d y / d s    = round(t) - t inside, -Q_N below, Q_P above (all three are
//                  clamp(t) - t + (outside ? clamp(t) : 0) with round(t) -> round(clamp(t)));
//   d y / d beta = 0 inside, 1 outside.
// Every operation is one float32 operation in a fixed order (no FMA: -ffp-contract=off), so
// the scalar, AVX2 and AVX-512 paths give bit-identical y and grad_x.
#pragma once
#include <cmath>
#include <cstdint>
#include "qk_hd.h"

namespace qk {

// -Q_N as a float; +0 (not -0) when Q_N = 0, as torch's clamp(min=0).
QK_HD float fq_lo(int32_t q_n) { return 0.0f - static_cast<float>(q_n); }

// clamp(t, lo, hi) with NaN passed through (torch.clamp's rule).
QK_HD float fq_clamp(float t, float lo, float hi) { return t < lo ? lo : (t > hi ? hi : t); }

// y of one element; b = 0 when there is no offset (x - 0 == x, -0 included).
QK_HD float fq_value(float x, float s, float inv, float b, bool has_b, float lo, float hi) {
  const float q = nearbyintf(fq_clamp((x - b) * inv, lo, hi));
  const float y = q * s;
  return has_b ? y + b : y;
}

// The backward of one element: grad_x, and the factors of grad_y in the sums of grad_s
// (s_term) and grad_beta (outside: 1, else 0).
struct FqGrad {
  float gx;
  float s_term;
  bool outside;
};

QK_HD FqGrad fq_grad(float x, float gy, float inv, float b, float lo, float hi) {
  const float t = (x - b) * inv;
  const float tc = fq_clamp(t, lo, hi);
  const bool outside = t < lo || t > hi;
  const bool inside = t >= lo && t <= hi;
  return {inside ? gy : 0.0f, outside ? tc : nearbyintf(tc) - tc, outside};
}

}  // namespace qk
