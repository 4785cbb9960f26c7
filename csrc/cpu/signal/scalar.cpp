// The reference coders (api.h): IMA-ADPCM (one row at a time, serial) and closed-loop DPCM.
#include <algorithm>
#include <cmath>

#include "cpu/signal/kernels.h"

namespace qk {
namespace signal {
namespace {

// IMA-ADPCM tables (IMA Digital Audio Focus and Technical Working Groups, "Recommended Practices
// for Enhancing Digital Audio Compatibility in Multimedia Systems", rev. 3.00, 1992).
constexpr int kIndexTable[16] = {-1, -1, -1, -1, 2, 4, 6, 8, -1, -1, -1, -1, 2, 4, 6, 8};
constexpr int kStepTable[89] = {
    7,     8,     9,     10,    11,    12,    13,    14,    16,    17,    19,    21,    23,
    25,    28,    31,    34,    37,    41,    45,    50,    55,    60,    66,    73,    80,
    88,    97,    107,   118,   130,   143,   157,   173,   190,   209,   230,   253,   279,
    307,   337,   371,   408,   449,   494,   544,   598,   658,   724,   796,   876,   963,
    1060,  1166,  1282,  1411,  1552,  1707,  1878,  2066,  2272,  2499,  2749,  3024,  3327,
    3660,  4026,  4428,  4871,  5358,  5894,  6484,  7132,  7845,  8630,  9493,  10442, 11487,
    12635, 13899, 15289, 16818, 18500, 20350, 22385, 24623, 27086, 29794, 32767};

inline int clamp_index(int i) { return i < 0 ? 0 : (i > 88 ? 88 : i); }
inline int clamp16(int v) { return v > 32767 ? 32767 : (v < -32768 ? -32768 : v); }

// The reconstruction step shared by encoder and decoder: step >> 3 plus the step fractions of
// the magnitude bits, added or subtracted by the sign bit, clamped to int16.
inline int reconstruct(int valpred, int step, int code) {
  int vpdiff = step >> 3;
  if (code & 4) vpdiff += step;
  if (code & 2) vpdiff += step >> 1;
  if (code & 1) vpdiff += step >> 2;
  return clamp16((code & 8) ? valpred - vpdiff : valpred + vpdiff);
}

}  // namespace

void adpcm_encode_row(const int16_t* pcm, int64_t n, uint8_t* codes, int32_t* state) {
  int valpred = state[0], index = state[1];
  for (int64_t i = 0; i < n; ++i) {
    const int step = kStepTable[index];
    int diff = pcm[i] - valpred, code = 0;
    if (diff < 0) {
      code = 8;
      diff = -diff;
    }
    int s = step;  // successive approximation of diff by step, step / 2, step / 4
    if (diff >= s) {
      code |= 4;
      diff -= s;
    }
    s >>= 1;
    if (diff >= s) {
      code |= 2;
      diff -= s;
    }
    s >>= 1;
    if (diff >= s) code |= 1;
    valpred = reconstruct(valpred, step, code);
    index = clamp_index(index + kIndexTable[code]);
    codes[i] = static_cast<uint8_t>(code);
  }
  state[0] = valpred;
  state[1] = index;
}

void adpcm_decode_row(const uint8_t* codes, int64_t n, int16_t* pcm, int32_t* state) {
  int valpred = state[0], index = state[1];
  for (int64_t i = 0; i < n; ++i) {
    const int code = codes[i] & 15;
    valpred = reconstruct(valpred, kStepTable[index], code);
    index = clamp_index(index + kIndexTable[code]);
    pcm[i] = static_cast<int16_t>(valpred);
  }
  state[0] = valpred;
  state[1] = index;
}

void dpcm_scalar(const DpcmJob& j, int64_t c0, int64_t c1) {
  const DpcmArgs& a = j.a;
  const int64_t C = a.c;
  const int half = 1 << (a.bits - 1);
  const double M = half - 1, lmu = std::log1p(static_cast<double>(a.mu));
  for (int64_t ch = c0; ch < c1; ++ch) {
    const float s = a.step[ch];
    for (int64_t t = 0; t < a.t; ++t) {
      float pred = 0.0f;
      for (int k = 1; k <= a.order; ++k)
        if (t - k >= 0) pred = pred + a.coef[(k - 1) * C + ch] * j.xh[(t - k) * C + ch];
      int code;
      if (j.x) {  // encode: the residual's code
        const float r = j.x[t * C + ch] - pred;
        if (a.quantizer == kDpcmMuLaw) {
          const double y = std::log1p(a.mu * std::min(std::fabs(double{r}) / s, 1.0)) / lmu;
          const int m = static_cast<int>(std::nearbyint(y * M));
          code = half + (r < 0 ? -m : m);
        } else if (a.bits == 1) {
          code = r >= 0.0f ? 1 : 0;
        } else {
          const float q = std::nearbyint(r / s);
          code = half + static_cast<int>(std::min(std::max(q, -float(half)), float(half - 1)));
        }
        j.codes[t * C + ch] = static_cast<uint8_t>(code);
      } else {
        code = j.codes[t * C + ch];
      }
      float v;
      if (a.quantizer == kDpcmMuLaw) {
        const int q = code - half, m = q < 0 ? -q : q;
        const double e = double{s} * std::expm1(m / M * lmu) / a.mu;
        v = static_cast<float>(q < 0 ? -e : e);
      } else if (a.bits == 1) {
        v = code ? s : -s;
      } else {
        v = static_cast<float>(code - half) * s;
      }
      j.xh[t * C + ch] = pred + v;
    }
  }
}

const Kernels kScalarKernels = {dpcm_scalar};

}  // namespace signal
}  // namespace qk
