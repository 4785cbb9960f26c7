// AVX-512 pieces shared by the tile-layout matmuls (gemm_w4, gemm_w23): tiles are taken in
// pairs, one 16-float register holding 16 rows (tile t in lanes 0..7, tile t + 1 in lanes
// 8..15; with a lone last tile both halves read it and the upper lanes are never stored).
// Provides the per-pair parameter loads, the output store, and the exact-mode GEMM over weights
// already decoded to k-major floats. Include only from the families' avx512.cpp / amx.cpp
// files. A
// format provides `decode(t, nt, g0, g1, w)` exactly as for tile/avx2.h: tiles t .. t+nt-1
// (nt 1 or 2), groups [g0, g1), w[(g - g0) * G * 16 + kk * 16 + 8 j + r] = float32(u - zc) of
// row 8(t+j)+r. The float32 operations and their order are tile_ref::exact's (ref.h), so the
// results are bit-identical to the scalar definition.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/runtime/aligned.h"

namespace qk {
namespace tile_avx512 {

constexpr int64_t kRows = 8;

// 8 floats at a in lanes 0..7, 8 at b in lanes 8..15. (The zero-masking forms: GCC 12 builds
// the plain ones from _mm512_undefined_*() and reports it as maybe-uninitialized.)
inline __m512 load_pair(const float* a, const float* b) {
  return _mm512_maskz_insertf32x8(0xFFFF, _mm512_maskz_loadu_ps(0xFF, a), _mm256_loadu_ps(b), 1);
}
inline __m512i load_pair(const uint8_t* a, const uint8_t* b) {
  return _mm512_maskz_inserti64x4(0xFF, _mm512_maskz_loadu_epi32(0xFF, a),
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
}

// The per-row parameters (scales, zero points: 8 per tile and group, index (t * ng + g) * 8 + r)
// of tiles t and t + nt - 1 for group g.
inline __m512 params_pair(const float* v, int64_t ng, int64_t t, int nt, int64_t g) {
  return load_pair(v + (t * ng + g) * kRows, v + ((t + nt - 1) * ng + g) * kRows);
}

// The code offsets zc of tiles t and t + nt - 1 for group g: the float zero points themselves
// if given (zeros_f), else zc0 + float(z) (z = 0 without zero points), as the scalar kernels
// compute them.
inline __m512 offsets_pair(const float* zeros_f, const int32_t* zeros, float zc0, int64_t ng,
                           int64_t t, int nt, int64_t g) {
  if (zeros_f) return params_pair(zeros_f, ng, t, nt, g);
  const __m512 base = _mm512_set1_ps(zc0);
  if (!zeros) return base;
  const auto* z8 = reinterpret_cast<const uint8_t*>(zeros);
  const __m512i z =
      load_pair(z8 + 4 * (t * ng + g) * kRows, z8 + 4 * ((t + nt - 1) * ng + g) * kRows);
  return _mm512_add_ps(base, _mm512_maskz_cvtepi32_ps(0xFFFF, z));
}

// y[m][8t .. 8t + 8 nt) = v (+ bias), the rows past N dropped.
template <typename P>
inline void store_pair(const P& p, int64_t m, int64_t t, int nt, __m512 v) {
  const int64_t n0 = t * kRows;
  float* out = p.y + m * p.n + n0;
  if (nt == 2 && n0 + 2 * kRows <= p.n) {
    if (p.bias) v = _mm512_add_ps(v, _mm512_loadu_ps(p.bias + n0));
    _mm512_storeu_ps(out, v);
    return;
  }
  const int64_t left = std::min<int64_t>(nt * kRows, p.n - n0);
  const __mmask16 keep = static_cast<__mmask16>((1u << left) - 1);
  if (p.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(keep, p.bias + n0));
  _mm512_mask_storeu_ps(out, keep, v);
}

// Register blocks of up to kMaxRows rows x kPairs tile pairs (16 kPairs columns): 16 FMA
// chains. (12 rows x 2 pairs and 8 rows x 3 pairs measured the same: 4096x4096, M = 512.)
constexpr int kPairs = 2;
constexpr int kMaxRows = 8;

// One group of MR rows x NQ tile pairs (the pairs' decoded k-major floats w[q]): acc chains
// over its k from zero, then ys = fma(scale, acc, ys) (ys: 16 kPairs floats per row, pair q at
// 16 q). Each broadcast activation feeds NQ FMAs: NQ loads + MR broadcasts per NQ MR FMAs, so
// with several pairs the FMA units, not the loads, set the pace (one pair: MR + 1 per MR).
template <int MR, int NQ, typename P>
void exact_block(const P& p, int64_t m, int64_t t, const int (&nt)[kPairs], int64_t g,
                 const float* const (&w)[kPairs], float* ys) {
  const float* x = p.x + m * p.k + g * p.group;
  __m512 acc[MR][NQ];
  for (int i = 0; i < MR; ++i)
    for (int q = 0; q < NQ; ++q) acc[i][q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < p.group; ++k) {
    __m512 wv[NQ];
    for (int q = 0; q < NQ; ++q) wv[q] = _mm512_loadu_ps(w[q] + k * 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 xb = _mm512_set1_ps(x[i * p.k + k]);
      for (int q = 0; q < NQ; ++q) acc[i][q] = _mm512_fmadd_ps(xb, wv[q], acc[i][q]);
    }
  }
  for (int q = 0; q < NQ; ++q) {
    const __m512 s = params_pair(p.scales, p.k / p.group, t + 2 * q, nt[q], g);
    for (int i = 0; i < MR; ++i) {
      float* y = ys + i * 16 * kPairs + 16 * q;
      _mm512_storeu_ps(y, _mm512_fmadd_ps(s, acc[i][q], _mm512_loadu_ps(y)));
    }
  }
}

template <int NQ, typename P>
void exact_block_rows(const P& p, int64_t m, int rows, int64_t t, const int (&nt)[kPairs],
                      int64_t g, const float* const (&w)[kPairs], float* ys) {
  using Fn = void (*)(const P&, int64_t, int64_t, const int(&)[kPairs], int64_t,
                      const float* const(&)[kPairs], float*);
  static constexpr Fn kFns[kMaxRows] = {exact_block<1, NQ, P>, exact_block<2, NQ, P>,
                                        exact_block<3, NQ, P>, exact_block<4, NQ, P>,
                                        exact_block<5, NQ, P>, exact_block<6, NQ, P>,
                                        exact_block<7, NQ, P>, exact_block<8, NQ, P>};
  kFns[rows - 1](p, m, t, nt, g, w, ys);
}

// Rows [m0, m1) x tiles [t0, t1): kPairs tile pairs (16 kPairs columns) at a time, each decoded
// once per chunk of groups (>= 256 k) into k-major floats, then register blocks of up to
// kMaxRows rows x those columns. Each output's chain is the definition's, whatever the blocking.
template <typename P, typename Decode>
void exact_gemm(const P& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1, Decode decode) {
  const int64_t ng = p.k / p.group, rows = m1 - m0, width = 16 * kPairs;
  const int64_t gpc = std::max<int64_t>(1, 256 / p.group);  // groups per chunk
  const int64_t span = gpc * p.group * 16;                   // floats per decoded pair
  // Zero-filled when grown, so the unused half of a lone tile's columns is always finite.
  thread_local AlignedVector<float> wbuf, ybuf;
  if (wbuf.size() < static_cast<size_t>(kPairs * span)) wbuf.resize(kPairs * span);
  if (ybuf.size() < static_cast<size_t>(rows * width)) ybuf.resize(rows * width);
  float* yp = ybuf.data();
  for (int64_t t = t0; t < t1; t += 2 * kPairs) {
    int nt[kPairs], nq = 0;
    for (int q = 0; q < kPairs; ++q) {
      const int64_t left = t1 - t - 2 * q;
      nt[q] = left >= 2 ? 2 : (left == 1 ? 1 : 0);
      nq += nt[q] > 0;
    }
    std::fill(yp, yp + rows * width, 0.0f);
    for (int64_t g0 = 0; g0 < ng; g0 += gpc) {
      const int64_t g1 = std::min(ng, g0 + gpc);
      for (int q = 0; q < nq; ++q) decode(t + 2 * q, nt[q], g0, g1, wbuf.data() + q * span);
      for (int64_t g = g0; g < g1; ++g) {  // a group's weights stay in L1 for every row
        const float* w[kPairs];
        for (int q = 0; q < kPairs; ++q) w[q] = wbuf.data() + q * span + (g - g0) * p.group * 16;
        const float* const(&wg)[kPairs] = w;
        for (int64_t i = 0; i < rows; i += kMaxRows) {
          const int r = static_cast<int>(std::min<int64_t>(kMaxRows, rows - i));
          float* ys = yp + i * width;
          if (nq == 2) exact_block_rows<2>(p, m0 + i, r, t, nt, g, wg, ys);
          else exact_block_rows<1>(p, m0 + i, r, t, nt, g, wg, ys);
        }
      }
    }
    for (int64_t i = 0; i < rows; ++i)
      for (int q = 0; q < nq; ++q)
        store_pair(p, m0 + i, t + 2 * q, nt[q], _mm512_loadu_ps(yp + i * width + 16 * q));
  }
}

}  // namespace tile_avx512
}  // namespace qk
