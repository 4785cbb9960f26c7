// Scalar 2-bit / 3-bit matmul kernels: the executable form of docs/numerics.md "2-bit and
// 3-bit group-wise matmul", element by element. The AVX2 kernels perform the same float32
// operations in the same order (FMA included, via std::fma here), so both paths give
// identical bits.
#include <cmath>

#include "cpu/gemm_w23.h"

namespace qk {
namespace w23 {
namespace {

inline int64_t param_index(const Problem& p, int64_t n, int64_t g) {
  return ((n / kW23Rows) * (p.k / p.group) + g) * kW23Rows + n % kW23Rows;
}

// zc = float(-qmin) + float(z): u - zc = q - z (exact for codes and zero points in range).
inline float code_offset(const Problem& p, int64_t pidx) {
  return p.zc0 + (p.zeros ? static_cast<float>(p.zeros[pidx]) : 0.0f);
}

// Exact mode: per group, a = FMA chain of x[k] * (float(u) - zc) along k from 0 (exact
// operand); y = FMA chain of scale * a over the groups; then + bias.
void exact_scalar(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = p.x + m * p.k;
    for (int64_t n = t0 * kW23Rows; n < t1 * kW23Rows && n < p.n; ++n) {
      float y = 0.0f;
      for (int64_t g = 0; g < p.k / p.group; ++g) {
        const int64_t pi = param_index(p, n, g);
        const float zc = code_offset(p, pi);
        float a = 0.0f;
        for (int64_t kk = g * p.group; kk < (g + 1) * p.group; ++kk)
          a = std::fma(x[kk], static_cast<float>(w23_code(p.packed, p.bits, p.k, n, kk)) - zc, a);
        y = std::fma(p.scales[pi], a, y);
      }
      if (p.bias) y += p.bias[n];
      p.y[m * p.n + n] = y;
    }
  }
}

// Fast mode: per block I = sum u * xq - zc * sum xq (exact integers), per group
// acc = FMA chain of dx * I, y = FMA chain of scale * acc; then + bias.
void fast_scalar(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  const int64_t nb = p.k / kW23Block, ng = p.k / p.group, bpg = p.group / kW23Block;
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xq = p.xq + m * p.k;
    const float* dx = p.dx + m * nb;
    const float* xs = p.xs + m * nb;
    for (int64_t n = t0 * kW23Rows; n < t1 * kW23Rows && n < p.n; ++n) {
      float y = 0.0f;
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t pi = param_index(p, n, g);
        const float zc = code_offset(p, pi);
        float acc = 0.0f;
        for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
          int32_t du = 0;  // sum of u * xq over the block: exact
          for (int64_t j = 0; j < kW23Block; ++j)
            du += w23_code(p.packed, p.bits, p.k, n, b * kW23Block + j) * xq[b * kW23Block + j];
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

}  // namespace

const Kernels kScalarKernels = {fast_scalar, exact_scalar};

}  // namespace w23
}  // namespace qk
