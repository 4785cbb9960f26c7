// The scalar definitions of the tile-layout group-wise matmuls (gemm_w4, gemm_w23), element by
// element, as docs/numerics.md states them. A format supplies how to read code u of (n, k) and
// the offset zc of a group (w = (u - zc) * scale exactly); the float32 operations and their
// order are the same for every format, and the AVX2 kernels follow them bit for bit.
#pragma once
#include <cmath>
#include <cstdint>

namespace qk {
namespace tile_ref {

// Index of (row n, group g) in the scales / zeros tile layout: (n / R, g, n % R).
template <int64_t R>
inline int64_t param_index(int64_t k, int64_t group, int64_t n, int64_t g) {
  return ((n / R) * (k / group) + g) * R + n % R;
}

// Exact mode: per group, a = FMA chain of x[k] * (float(u) - zc) along k from 0 (an exact
// operand); y = FMA chain of scale * a over the groups; then + bias. Rows of tiles [t0, t1).
template <int64_t R, typename P, typename Code, typename Offset>
void exact(const P& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1, Code code, Offset zc_of) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = p.x + m * p.k;
    for (int64_t n = t0 * R; n < t1 * R && n < p.n; ++n) {
      float y = 0.0f;
      for (int64_t g = 0; g < p.k / p.group; ++g) {
        const int64_t pi = param_index<R>(p.k, p.group, n, g);
        const float zc = zc_of(pi);
        float a = 0.0f;
        for (int64_t kk = g * p.group; kk < (g + 1) * p.group; ++kk)
          a = std::fma(x[kk], static_cast<float>(code(n, kk)) - zc, a);
        y = std::fma(p.scales[pi], a, y);
      }
      if (p.bias) y += p.bias[n];
      p.y[m * p.n + n] = y;
    }
  }
}

// Fast mode over int8 activations in blocks of B: per block I = sum u * xq - zc * sum xq
// (exact integers), per group acc = FMA chain of dx * I, y = FMA chain of scale * acc; then
// + bias.
template <int64_t R, int64_t B, typename P, typename Code, typename Offset>
void fast(const P& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1, Code code, Offset zc_of) {
  const int64_t nb = p.k / B, ng = p.k / p.group, bpg = p.group / B;
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* xq = p.xq + m * p.k;
    const float* dx = p.dx + m * nb;
    const float* xs = p.xs + m * nb;
    for (int64_t n = t0 * R; n < t1 * R && n < p.n; ++n) {
      float y = 0.0f;
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t pi = param_index<R>(p.k, p.group, n, g);
        const float zc = zc_of(pi);
        float acc = 0.0f;
        for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
          int32_t du = 0;  // sum of u * xq over the block: exact
          for (int64_t j = 0; j < B; ++j) du += code(n, b * B + j) * xq[b * B + j];
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

}  // namespace tile_ref
}  // namespace qk
