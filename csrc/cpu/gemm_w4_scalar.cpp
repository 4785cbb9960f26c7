// Scalar int4 matmul kernels: the executable form of docs/numerics.md "int4 group-wise
// matmul", element by element. The AVX2 kernels perform the same float32 operations in the
// same order (FMA included, via std::fma here), so both paths give identical bits.
#include <cfloat>
#include <cmath>

#include "cpu/gemm_w4.h"

namespace qk {
namespace w4 {
namespace {

// Fast-mode activation quantization, per block of 32: dx = amax / 127, xq = clamp(rne(x * (1
// / dx)), -127, 127). A block with NaN/Inf gets dx = NaN (its outputs become NaN); a block with
// dx < FLT_MIN (zero or subnormal) gets dx = 0 and xq = 0.
void quantize_x_scalar(const float* x, int64_t k, int64_t m0, int64_t m1, int8_t* xq, float* dx,
                       float* xs) {
  const int64_t nb = k / kW4Block;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * k + b * kW4Block;
      int8_t* qb = xq + m * k + b * kW4Block;
      float amax = 0.0f;
      bool bad = false;
      for (int j = 0; j < kW4Block; ++j) {
        float a = std::fabs(xb[j]);
        if (!(a <= FLT_MAX)) bad = true;
        else if (a > amax) amax = a;
      }
      float d = amax / 127.0f;
      int32_t sum = 0;
      if (bad || d < FLT_MIN) {
        for (int j = 0; j < kW4Block; ++j) qb[j] = 0;
        d = bad ? NAN : 0.0f;
      } else {
        const float r = 1.0f / d;
        for (int j = 0; j < kW4Block; ++j) {
          float v = std::nearbyint(xb[j] * r);
          v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
          qb[j] = static_cast<int8_t>(v);
          sum += qb[j];
        }
      }
      dx[m * nb + b] = d;
      xs[m * nb + b] = static_cast<float>(sum);
    }
  }
}

// (8 + z) as float: the code offset of a group (unsigned nibble u = q + 8, value u - zc).
inline float code_offset(const Problem& p, int64_t pidx) {
  return 8.0f + (p.zeros ? static_cast<float>(p.zeros[pidx]) : 0.0f);
}

inline int64_t param_index(const Problem& p, int64_t n, int64_t g) {
  return ((n / kW4Rows) * (p.k / p.group) + g) * kW4Rows + n % kW4Rows;
}

void fast_scalar(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  const int64_t nb = p.k / kW4Block, ng = p.k / p.group, bpg = p.group / kW4Block;
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xq = p.xq + m * p.k;
    const float* dx = p.dx + m * nb;
    const float* xs = p.xs + m * nb;
    for (int64_t n = t0 * kW4Rows; n < t1 * kW4Rows && n < p.n; ++n) {
      float y = 0.0f;
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t pi = param_index(p, n, g);
        const float zc = code_offset(p, pi);
        float acc = 0.0f;
        for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
          int32_t du = 0;  // sum of u * xq over the block: exact
          for (int64_t j = 0; j < kW4Block; ++j)
            du += w4_nibble(p.packed, p.k, n, b * kW4Block + j) * xq[b * kW4Block + j];
          // sum (u - zc) * xq = du - zc * xs, exact in float32 (integers below 2^24)
          const float idot = std::fma(-zc, xs[b], static_cast<float>(du));
          acc = std::fma(dx[b], idot, acc);
        }
        y = std::fma(p.scales[pi], acc, y);
      }
      if (p.bias) y += p.bias[n];
      p.y[m * p.n + n] = y;
    }
  }
}

// Exact mode: per group, a = FMA chain of x[k] * float(q - z) along k from 0 (q - z exact);
// y = FMA chain of scale * a over the groups; then + bias.
void exact_scalar(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = p.x + m * p.k;
    for (int64_t n = t0 * kW4Rows; n < t1 * kW4Rows && n < p.n; ++n) {
      float y = 0.0f;
      for (int64_t g = 0; g < p.k / p.group; ++g) {
        const int64_t pi = param_index(p, n, g);
        const float zc = code_offset(p, pi);
        float a = 0.0f;
        for (int64_t kk = g * p.group; kk < (g + 1) * p.group; ++kk)
          a = std::fma(x[kk], static_cast<float>(w4_nibble(p.packed, p.k, n, kk)) - zc, a);
        y = std::fma(p.scales[pi], a, y);
      }
      if (p.bias) y += p.bias[n];
      p.y[m * p.n + n] = y;
    }
  }
}

}  // namespace

const Kernels kScalarKernels = {quantize_x_scalar, fast_scalar, exact_scalar};

}  // namespace w4
}  // namespace qk
