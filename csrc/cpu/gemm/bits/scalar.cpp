// Scalar reference kernels of the binary / ternary matmuls (see api.h): the definition.
// Float activations: +-x[k] added in k order; XNOR: exact integer popcounts.
#include <algorithm>

#include "cpu/gemm/bits/kernels.h"

namespace qk {
namespace bits {
namespace {

// x with its sign flipped when `neg` (exact: no multiply).
inline float flip(float x, uint32_t neg) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u ^= (neg & 1u) << 31;
  std::memcpy(&x, &u, 4);
  return x;
}

void float_tiles_scalar(const FloatProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  const int64_t K = p.K, Kb = bits_blocks(K);
  const int64_t n1 = std::min(p.N, t1 * kBitsRows);
  for (int64_t n = t0 * kBitsRows; n < n1; ++n)
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = p.x + m * K;
      float acc = 0.0f;
      for (int64_t h = 0; h < Kb; ++h) {
        const int64_t len = std::min(kBitsBlock, K - kBitsBlock * h);
        const float* xb = xr + kBitsBlock * h;
        if (p.ternary) {
          const uint32_t pos = load_u32(p.w + bits_word_offset(K, true, n, h, 0));
          const uint32_t neg = load_u32(p.w + bits_word_offset(K, true, n, h, 1));
          for (int64_t j = 0; j < len; ++j)
            if (((pos ^ neg) >> j) & 1) acc += flip(xb[j], neg >> j);
        } else {
          const uint32_t neg = load_u32(p.w + bits_word_offset(K, false, n, h, 0));
          for (int64_t j = 0; j < len; ++j) acc += flip(xb[j], neg >> j);
        }
      }
      p.y[m * p.N + n] = epilogue_f32(acc, p.alpha, p.bias, n);
    }
}

// Portable popcount (SWAR): this file is built without -mpopcnt.
inline int64_t popcount32(uint32_t v) {
  v = v - ((v >> 1) & 0x55555555u);
  v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
  v = (v + (v >> 4)) & 0x0F0F0F0Fu;
  return static_cast<int64_t>((v * 0x01010101u) >> 24);
}

void xnor_tiles_scalar(const XnorProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  const int64_t K = p.K, Kb = bits_blocks(K);
  const int64_t n1 = std::min(p.N, t1 * kBitsRows);
  for (int64_t n = t0 * kBitsRows; n < n1; ++n)
    for (int64_t m = m0; m < m1; ++m) {
      const uint32_t* xr = p.xw + m * Kb;
      int64_t pop = 0;
      for (int64_t h = 0; h < Kb; ++h) {
        const uint32_t wv = load_u32(p.w + bits_word_offset(K, false, n, h, 0));
        pop += popcount32((xr[h] ^ wv) & block_mask(h, K));
      }
      p.y[m * p.N + n] = epilogue_xnor(K, pop, p.alpha[n], p.beta[m], p.bias, n);
    }
}

}  // namespace

const Kernels kScalarKernels = {nullptr, float_tiles_scalar, xnor_tiles_scalar, nullptr};

}  // namespace bits
}  // namespace qk
