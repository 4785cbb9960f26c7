// Float activations on the AMX tile unit at float32 accuracy ("bf16x3"), for the float-
// activation matmuls whose weights bfloat16 holds exactly (int8 codes, fp8 values, +-1) and whose
// definitions fix a bound, not an order (W8A16, fp8; docs/numerics.md). Include only from amx.cpp
// files (built with AMX-BF16 / AVX512_BF16) and run only where cpu_has_amx_bf16().
//
// - Split. Each activation row is cut into three bfloat16 pieces, x = x1 + x2 + x3 exactly:
//   x1 = bf16(x) (round to nearest even), x2 = bf16(x - x1), x3 = x - x1 - x2. Each difference
//   is exact in float32 and x3 has at most 8 significant bits, so it is a bfloat16 itself;
//   |x2| <= 2^-8 |x|, |x3| <= 2^-16 |x|.
// - Products. tdpbf16ps multiplies bfloat16 pairs exactly (8 x 8 significant bits) and adds each
//   product to a float32 sum, rounding to nearest. Two sums per output and group:
//   hi = sum x1 w (K products), lo = sum (x2 w + x3 w) (2K products); then c = hi + lo and the
//   format's epilogue (y = fma(s, c, y) per group).
// - Bound. |c - sum x w| <= (K (1 + 2^-8) + 2K 2^-8 (1 + 2^-8) + 1) u sum |x w| + O(u^2), i.e.
//   (K + 3K/256 + 1) u for a group of K (u = 2^-24): a float32 sum's K u plus 1.2 %.
// - Range. The tile unit treats bfloat16 subnormals as zero and flushes float32 subnormal sums.
//   A row whose nonzero |x| all lie in [2^-64, 2^64] (finite) has pieces of at least 2^-87 and
//   sums that are multiples of 2^-103 (weights are multiples of 2^-16), far from subnormal, and
//   no overflow in the sums; other rows (NaN, Inf, tiny or huge values) are flagged by split()
//   with zero pieces, and the family reruns them on its AVX-512 kernel.
//
// Layouts (bfloat16 as uint16_t):
// - activations, per 16-row tile rt and step s of 32 k: three 16 x 32 tiles (one per piece),
//   a[((rt * ns + s) * 3 + p) * 512 + 32 t + kk] = piece p of x[16 rt + t][32 s + kk], zero past
//   K and past the last row;
// - weights, per panel of 32 columns: for step s, two tiles j (columns 16 j .. 16 j + 15) of 16
//   k-pair rows, w[((s - s0) * 2 + j) * 512 + 32 r + 2 n + e] = w[c0 + 16 j + n][32 s + 2 r + e]
//   (zero past N and K): the VNNI layout tdpbf16ps takes.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/runtime/aligned.h"
#include "cpu/runtime/amx_tiles.h"
#include "cpu/runtime/threadpool.h"

namespace qk {
namespace tile_bf16x3 {

constexpr int64_t kStep = 32;        // k per tile step
constexpr int64_t kTile = 512;       // bfloat16 values per 16 x 64-byte tile
constexpr int64_t kPanelSteps = 8;  // steps per weight panel at most (256 k: 2 x 8 KiB a pair)

inline int64_t steps(int64_t k) { return (k + kStep - 1) / kStep; }
// The first `count` of 16 lanes (none for count <= 0).
inline __mmask16 lanes(int64_t count) {
  if (count >= 16) return 0xFFFF;
  return static_cast<__mmask16>((1u << (count > 0 ? count : 0)) - 1);
}
inline int64_t row_tiles(int64_t rows) { return (rows + 15) / 16; }
// uint16_t values of the activation tiles for `rows` rows.
inline int64_t split_size(int64_t rows, int64_t k) {
  return row_tiles(rows) * steps(k) * 3 * kTile;
}

// 32 bfloat16 (two 16-float halves, lo first) from 32 floats that bfloat16 holds.
inline __m512i to_bf16(__m512 lo, __m512 hi) { return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); }
// bfloat16 lanes 16 h .. 16 h + 15 of v back to float32 (exact).
inline __m512 from_bf16(__m512i v, int h) {
  const __m256i half = h ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// One weight tile from its 16 columns' 32 bfloat16 each (r[n]: column n's k values in order):
// tile row q (k pair q) = dword q of every column, a 16 x 16 dword transpose.
inline void store_columns(__m512i (&r)[16], uint16_t* dst) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // lanes: [a0 b0 a1 b1], [a2 b2 a3 b3] per 128 bits
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + j], lane L: columns 4i .. 4i + 3 at k pair 4L + j
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // a 4 x 4 transpose of 128-bit lanes
    const __m512i p0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44);
    const __m512i p1 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
    const __m512i p2 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
    const __m512i p3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    _mm512_storeu_si512(dst + 32 * j, _mm512_shuffle_i32x4(p0, p1, 0x88));
    _mm512_storeu_si512(dst + 32 * (4 + j), _mm512_shuffle_i32x4(p0, p1, 0xDD));
    _mm512_storeu_si512(dst + 32 * (8 + j), _mm512_shuffle_i32x4(p2, p3, 0x88));
    _mm512_storeu_si512(dst + 32 * (12 + j), _mm512_shuffle_i32x4(p2, p3, 0xDD));
  }
}

// Rows [r0, r1) of x (row stride k) into activation tiles `a` (split_size(r1 - r0, k) values;
// the last tile's rows past r1 are left as they are: a tile row only ever meets its own output
// row, which is not stored); bad[i] = 1 for row r0 + i out of range (its pieces zero).
// Returns how many rows are bad.
inline int64_t split(const float* x, int64_t k, int64_t r0, int64_t r1, uint16_t* a,
                     uint8_t* bad) {
  const int64_t ns = steps(k), rows = r1 - r0;
  const __m512 big = _mm512_set1_ps(0x1p64f), tiny = _mm512_set1_ps(0x1p-64f);
  const __m512 zero = _mm512_setzero_ps();
  int64_t nbad = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = x + (r0 + i) * k;
    uint16_t* base = a + (i / 16) * ns * 3 * kTile + 32 * (i % 16);
    __mmask16 out = 0;
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t left = k - s * kStep;
      __m512 v[2] = {_mm512_maskz_loadu_ps(lanes(left), xr + s * kStep),
                     _mm512_maskz_loadu_ps(lanes(left - 16), xr + s * kStep + 16)};
      for (int h = 0; h < 2; ++h) {
        const __m512 av = _mm512_abs_ps(v[h]);
        const __mmask16 small = _mm512_cmp_ps_mask(av, tiny, _CMP_LT_OQ) &
                                _mm512_cmp_ps_mask(av, zero, _CMP_NEQ_OQ);
        out |= _mm512_cmp_ps_mask(av, big, _CMP_NLE_UQ) | small;  // NaN, Inf, > 2^64, < 2^-64
      }
      uint16_t* dst = base + s * 3 * kTile;
      for (int p = 0; p < 3; ++p) {
        const __m512i b = to_bf16(v[0], v[1]);
        _mm512_storeu_si512(dst + p * kTile, b);
        v[0] = _mm512_sub_ps(v[0], from_bf16(b, 0));
        v[1] = _mm512_sub_ps(v[1], from_bf16(b, 1));
      }
    }
    bad[i] = out != 0;
    if (out) {
      ++nbad;
      for (int64_t s = 0; s < ns; ++s)
        for (int p = 0; p < 3; ++p) std::memset(base + (s * 3 + p) * kTile, 0, 64);
    }
  }
  return nbad;
}

// A format F (the family's weights):
//   int64_t n, k, group;    // group: k per scale group, a multiple of 32, or >= k (one group)
//   void decode(int64_t c0, int64_t s0, int64_t s1, uint16_t* w) const;  // the panel above
//   __m512 scale(int64_t c, int64_t g) const;   // group g's scales of columns c .. c + 15
//   void store(int64_t row, int64_t c, __m512 y, __mmask16 keep) const;  // y (+ bias)
//
// Rows [row0, row0 + rows) whose tiles start at `a` (ns steps per row tile) x columns [c0, c1):
// per panel of 512 k and 32 columns, each 16-row tile accumulates hi / lo for the two 16-column
// tiles (tiles 0-1 hi, 2-3 lo, 4-5 weights, 6-7 activation pieces), group by group; a group's
// sums (c = hi + lo) go through y = fma(s, c, y) for every row, then store().
template <typename F>
void gemm(const F& f, const uint16_t* a, int64_t ns, int64_t row0, int64_t rows, int64_t c0,
          int64_t c1) {
  const int64_t nrt = row_tiles(rows), npairs = (c1 - c0 + 31) / 32;
  // Steps per group, and per panel: whole groups where they fit (else the sums of a group
  // that spans panels wait in `held`).
  const int64_t gs = std::min<int64_t>(f.group >= f.k ? ns : f.group / kStep, ns);
  const int64_t ps = gs <= kPanelSteps ? kPanelSteps / gs * gs : kPanelSteps;
  thread_local AlignedVector<uint16_t> wbuf;
  thread_local AlignedVector<float> ybuf, cbuf;
  wbuf.resize(static_cast<size_t>(npairs * kPanelSteps * 2 * kTile));
  ybuf.assign(static_cast<size_t>(npairs * nrt * 16 * 32), 0.0f);
  if (gs > ps) cbuf.resize(static_cast<size_t>(npairs * nrt * 4 * 256));
  alignas(64) float c[4][256];
  static const AmxTileConfig config({16, 16, 16, 16, 16, 16, 16, 16},  // every tile 16 x 64 B
                                    {64, 64, 64, 64, 64, 64, 64, 64});
  _tile_loadconfig(&config);
  for (int64_t s0 = 0; s0 < ns; s0 += ps) {
    const int64_t s1 = std::min(ns, s0 + ps);
    for (int64_t cp = 0; cp < npairs; ++cp)
      f.decode(c0 + 32 * cp, s0, s1, wbuf.data() + cp * ps * 2 * kTile);
    for (int64_t rt = 0; rt < nrt; ++rt) {
      for (int64_t cp = 0; cp < npairs; ++cp) {
        const int64_t cc = c0 + 32 * cp;
        const uint16_t* at = a + rt * ns * 3 * kTile;
        float* held = gs > ps ? cbuf.data() + (cp * nrt + rt) * 4 * 256 : nullptr;
        float* y = ybuf.data() + (cp * nrt + rt) * 16 * 32;
        for (int64_t s = s0; s < s1;) {
          const int64_t g = s / gs, end = std::min(s1, (g + 1) * gs);
          if (s == g * gs) {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
          } else {
            _tile_loadd(0, held, 64); _tile_loadd(1, held + 256, 64);
            _tile_loadd(2, held + 512, 64); _tile_loadd(3, held + 768, 64);
          }
          for (; s < end; ++s) {
            const uint16_t* w = wbuf.data() + (cp * ps + s - s0) * 2 * kTile;
            const uint16_t* ap = at + s * 3 * kTile;
            _tile_loadd(4, w, 64);
            _tile_loadd(5, w + kTile, 64);
            _tile_loadd(6, ap, 64);
            _tile_dpbf16ps(0, 6, 4);
            _tile_dpbf16ps(1, 6, 5);
            _tile_loadd(7, ap + kTile, 64);
            _tile_dpbf16ps(2, 7, 4);
            _tile_dpbf16ps(3, 7, 5);
            _tile_loadd(6, ap + 2 * kTile, 64);
            _tile_dpbf16ps(2, 6, 4);
            _tile_dpbf16ps(3, 6, 5);
          }
          if (end == (g + 1) * gs || end == ns) {  // group g complete
            _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64);
            _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
            const __m512 sc0 = f.scale(cc, g), sc1 = f.scale(cc + 16, g);
            for (int t = 0; t < 16; ++t) {
              float* yt = y + 32 * t;
              const __m512 v0 = _mm512_add_ps(_mm512_load_ps(c[0] + 16 * t),
                                              _mm512_load_ps(c[2] + 16 * t));
              const __m512 v1 = _mm512_add_ps(_mm512_load_ps(c[1] + 16 * t),
                                              _mm512_load_ps(c[3] + 16 * t));
              _mm512_storeu_ps(yt, _mm512_fmadd_ps(sc0, v0, _mm512_loadu_ps(yt)));
              _mm512_storeu_ps(yt + 16, _mm512_fmadd_ps(sc1, v1, _mm512_loadu_ps(yt + 16)));
            }
          } else {
            _tile_stored(0, held, 64); _tile_stored(1, held + 256, 64);
            _tile_stored(2, held + 512, 64); _tile_stored(3, held + 768, 64);
          }
        }
      }
    }
  }
  _tile_release();
  for (int64_t cp = 0; cp < npairs; ++cp)
    for (int64_t rt = 0; rt < nrt; ++rt)
      for (int t = 0; t < 16 && 16 * rt + t < rows; ++t)
        for (int j = 0; j < 2; ++j) {
          const int64_t col = c0 + 32 * cp + 16 * j, left = std::min(c1, f.n) - col;
          if (left <= 0) continue;
          f.store(row0 + 16 * rt + t, col,
                  _mm512_loadu_ps(ybuf.data() + ((cp * nrt + rt) * 16 + t) * 32 + 16 * j),
                  lanes(left));
        }
}

// A whole call, m rows of x (row stride k) x the format's n columns: in slabs of kSlab rows,
// the slab's rows are split once (16-row tiles in parallel), then tasks of up to 128 rows x
// 512 columns (about 4 per thread at least) run gemm(); then rerun(row) for each row split()
// flagged. Each output is computed by one task, whole, so the thread count changes nothing.
// (A task streams its rows' pieces once: 512 columns read them a quarter as often as 128 did,
// W8A16 M = 512 4096x4096 / 11008x4096 / 4096x11008 31.5 / 85 / 97 -> 27.3 / 68.5 / 77.2 ms;
// 1024 columns measured the same as 512.)
constexpr int64_t kSlab = 512;  // rows split at a time (512 x 4096 k: 12 MiB of pieces)

template <typename F, typename Rerun>
void run_call(const F& f, const float* x, int64_t m, Rerun rerun) {
  const int64_t k = f.k, n = f.n, ns = steps(k);
  const int threads = pool_threads();
  AlignedVector<uint16_t> a(static_cast<size_t>(split_size(std::min(m, kSlab), k)));
  AlignedVector<uint8_t> bad(static_cast<size_t>(std::min(m, kSlab)));
  for (int64_t r0 = 0; r0 < m; r0 += kSlab) {
    const int64_t r1 = std::min(m, r0 + kSlab), rows = r1 - r0, nrt = row_tiles(rows);
    AlignedVector<int64_t> nbad(static_cast<size_t>(nrt));
    auto split_tile = [&](int64_t t) {
      const int64_t t0 = r0 + 16 * t, t1 = std::min(r1, t0 + 16);
      nbad[t] = split(x, k, t0, t1, a.data() + t * ns * 3 * kTile, bad.data() + 16 * t);
    };
    const int64_t mt = (rows + 127) / 128, pairs = (n + 31) / 32;
    const int64_t cpt = std::max<int64_t>(1, std::min<int64_t>(16, pairs * mt / (4 * threads)));
    const int64_t nt = (pairs + cpt - 1) / cpt;
    auto task = [&](int64_t c) {
      const int64_t i0 = (c % mt) * 128, p0 = (c / mt) * cpt;
      gemm(f, a.data() + (i0 / 16) * ns * 3 * kTile, ns, r0 + i0, std::min<int64_t>(128, rows - i0),
           32 * p0, std::min(n, 32 * (p0 + cpt)));
    };
    if (threads == 1) {
      for (int64_t t = 0; t < nrt; ++t) split_tile(t);
      for (int64_t c = 0; c < mt * nt; ++c) task(c);
    } else {
      parallel_for(nrt, split_tile);
      parallel_for(mt * nt, task);
    }
    for (int64_t t = 0; t < nrt; ++t) {
      if (!nbad[t]) continue;
      for (int64_t i = 16 * t; i < std::min(rows, 16 * t + 16); ++i)
        if (bad[i]) rerun(r0 + i);
    }
  }
}

}  // namespace tile_bf16x3
}  // namespace qk
