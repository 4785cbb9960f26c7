// AVX2 pieces shared by the tile-layout matmuls (gemm_w4, gemm_w23): the output store of one
// 8-row tile and the exact-mode GEMM over weights already decoded to k-major floats. Include
// only from the families' avx2.cpp files (compiled with -mavx2 -mfma). A format provides
// `decode(t, nt, g0, g1, w)`: tiles t .. t+nt-1 (nt 1 or 2), groups [g0, g1), written as
// w[(g - g0) * G * 16 + kk * 16 + 8 j + r] = float32(u - zc) of row 8(t+j)+r. The float32
// operations and their order are tile_ref::exact's (ref.h), so results are bit-identical to
// the scalar definition.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/gemm/tile/exact_loop.h"

namespace qk {
namespace tile_avx2 {

constexpr int64_t kRows = 8;

// y[m][8t .. 8t+7] = v (+ bias), the rows past N dropped.
template <typename P>
inline void store_tile(const P& p, int64_t m, int64_t t, __m256 v) {
  const int64_t n0 = t * kRows;
  float* out = p.y + m * p.n + n0;
  if (n0 + kRows <= p.n) {
    if (p.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(p.bias + n0));
    _mm256_storeu_ps(out, v);
    return;
  }
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int64_t r = 0; n0 + r < p.n; ++r) out[r] = p.bias ? tmp[r] + p.bias[n0 + r] : tmp[r];
}

// One group of MR rows x NT tiles: acc chains over its k from zero, then
// ys = fma(scale, acc, ys) (ys: 16 floats per row).
template <int MR, int NT, typename P>
void exact_block(const P& p, int64_t m, int64_t t, int64_t g, const float* w, float* ys) {
  const int64_t ng = p.k / p.group;
  const float* x = p.x + m * p.k + g * p.group;
  __m256 acc[MR][NT];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < p.group; ++k) {
    __m256 wv[NT];
    for (int j = 0; j < NT; ++j) wv[j] = _mm256_loadu_ps(w + k * 16 + 8 * j);
    for (int i = 0; i < MR; ++i) {
      const __m256 xb = _mm256_broadcast_ss(x + i * p.k + k);
      for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_fmadd_ps(xb, wv[j], acc[i][j]);
    }
  }
  for (int j = 0; j < NT; ++j) {
    const __m256 s = _mm256_loadu_ps(p.scales + ((t + j) * ng + g) * kRows);
    for (int i = 0; i < MR; ++i) {
      float* yp = ys + i * 16 + 8 * j;
      _mm256_storeu_ps(yp, _mm256_fmadd_ps(s, acc[i][j], _mm256_loadu_ps(yp)));
    }
  }
}

template <int NT, typename P>
void exact_block_rows(const P& p, int64_t m, int rows, int64_t t, int64_t g, const float* w,
                      float* ys) {
  using Fn = void (*)(const P&, int64_t, int64_t, int64_t, const float*, float*);
  static constexpr Fn kFns[5] = {exact_block<1, NT, P>, exact_block<2, NT, P>,
                                 exact_block<3, NT, P>, exact_block<4, NT, P>,
                                 exact_block<5, NT, P>};
  kFns[rows - 1](p, m, t, g, w, ys);
}

// Rows [m0, m1) x tiles [t0, t1): pairs of tiles decoded once per chunk of groups (>= 256 k,
// L1-resident) into k-major floats, then 5 x 16 register blocks over the rows.
template <typename P, typename Decode>
void exact_gemm(const P& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1, Decode decode) {
  tile_loop::pairs_by_groups<5>(
      p, t0, t1, m0, m1, decode,
      [&p](int64_t m, int rows, int64_t t, int nt, int64_t g, const float* w, float* ys) {
        if (nt == 2) exact_block_rows<2>(p, m, rows, t, g, w, ys);
        else exact_block_rows<1>(p, m, rows, t, g, w, ys);
      },
      [&p](int64_t m, int64_t t, int nt, const float* ys) {
        for (int j = 0; j < nt; ++j) store_tile(p, m, t + j, _mm256_loadu_ps(ys + 8 * j));
      });
}

}  // namespace tile_avx2
}  // namespace qk
