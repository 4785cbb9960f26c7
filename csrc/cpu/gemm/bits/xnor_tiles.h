// The XNOR tile loop shared by the SIMD kernels (avx2.cpp, avx512.cpp): activation rows in
// batches of 4, 2, 1, each over the weight tiles, and the epilogue. Include only from the SIMD
// translation units (it uses AVX2 vectors).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu/gemm/bits/kernels.h"

namespace qk {
namespace bits {

// rows(mt, xr, wt, out): out[r] lane i = popcount of (x row r ^ weight row 8t + i) over the
// tile's Kb blocks at wt, for the mt (4, 2 or 1) rows whose sign words are xr[0 .. mt).
template <typename Rows>
inline void xnor_tiles_loop(const XnorProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1,
                            Rows rows) {
  const int64_t Kb = bits_blocks(p.K);
  for (int64_t m = m0; m < m1;) {
    const int mt = m1 - m >= 4 ? 4 : m1 - m >= 2 ? 2 : 1;
    const uint32_t* xr[4];
    for (int r = 0; r < mt; ++r) xr[r] = p.xw + (m + r) * Kb;
    for (int64_t t = t0; t < t1; ++t) {
      __m256i pop[4];
      rows(mt, xr, p.w + t * Kb * 32, pop);
      const int64_t n0 = t * kBitsRows, nn = std::min(kBitsRows, p.N - n0);
      for (int r = 0; r < mt; ++r) {
        alignas(32) int32_t o[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(o), pop[r]);
        float* yr = p.y + (m + r) * p.N;
        for (int64_t i = 0; i < nn; ++i)
          yr[n0 + i] = epilogue_xnor(p.K, o[i], p.alpha[n0 + i], p.beta[m + r], p.bias, n0 + i);
      }
    }
    m += mt;
  }
}

}  // namespace bits
}  // namespace qk
