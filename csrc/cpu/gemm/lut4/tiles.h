// The tiled GEMM loop the SIMD kernels of gemm_lut4 share (avx2.cpp, avx512.cpp): rows of W in
// tiles of kNr, decoded kKc columns at a time into an L1 buffer, every row of x run against
// each decoded tile, so decoding costs O(N K) per task instead of O(M N K).
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpu/gemm/lut4/kernels.h"

namespace qk {
namespace lut4 {

// y[m0..m1) x [n0..n1) = bias (or 0) + the sum over chunks of x . w. decode(j, k0, kc, dst)
// writes W[j][k0, k0 + kc) to dst; micro(i, rows_left, k0, kc, w, j0, nr) adds x[i..][k0, k0
// + kc) . w[r] to y[i..][j0 + r] for r < nr and returns how many rows of x it took.
template <int64_t kNr, int64_t kKc, class Decode, class Micro>
void gemm_tiles(const Lut4Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                const Decode& decode, const Micro& micro) {
  alignas(64) float w[kNr][kKc];
  for (int64_t j0 = n0; j0 < n1; j0 += kNr) {
    const int64_t nr = std::min(kNr, n1 - j0);
    for (int64_t i = m0; i < m1; ++i)
      for (int64_t r = 0; r < nr; ++r) a.y[i * a.n + j0 + r] = a.bias ? a.bias[j0 + r] : 0.0f;
    for (int64_t k0 = 0; k0 < a.k; k0 += kKc) {
      const int64_t kc = std::min(kKc, a.k - k0);
      for (int64_t r = 0; r < kNr; ++r) {
        if (r < nr) decode(j0 + r, k0, kc, w[r]);
        else std::fill(w[r], w[r] + kc, 0.0f);  // padding rows: computed, never stored
      }
      for (int64_t i = m0; i < m1;) i += micro(i, m1 - i, k0, kc, w, j0, nr);
    }
  }
}

}  // namespace lut4
}  // namespace qk
