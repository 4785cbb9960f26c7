// AVX-512 W8A16 kernel (float activations x int8 weights, layout in api.h), the f32 entry of
// avx512_kernels(). The sums are float32 FMA chains, as in the AVX2 kernel:
// - few rows (GEMV): codes converted in registers, once for all the rows; each lane of a[j] is
//   one FMA chain over the k of one residue mod 4 (columns 4j .. 4j+3), and the four chains of
//   a column are added as (t0 + t1) + (t2 + t3), the order of the AVX2 GEMV kernel's hadds;
// - more rows: a 16-column block is dequantized kKc k at a time into a float panel and an
//   MR x NR micro-kernel runs one FMA chain per output in k order (the AVX2 panel kernel's
//   order, so those outputs equal the AVX2 ones bit for bit).
// (Zen 4: the int8 -> int32 widening, a shuffle, bounds the GEMV at ~27 GB/s of codes per core,
// as in the AVX2 kernel; FMA throughput is the same for ymm and zmm, so the panel path gains
// only from its larger register tile.)
// Either way each output is a float32 sum of its K products in some order, within the bound
// of docs/numerics.md ((K + 4) u relative to sum |x q| s + |b|), which the tests check.
#include <immintrin.h>

#include <type_traits>
#include <vector>

#include "cpu/gemm/w8/epilogue_avx512.h"
#include "cpu/gemm/w8/kernels.h"
#include "cpu/runtime/aligned.h"

namespace qk {
namespace w8 {
namespace {

constexpr int kGemvRows = 3;  // tiles of at most this many rows use the GEMV kernel
constexpr int kMrF = 8;       // rows per float micro-tile
constexpr int kNrF = 3;       // blocks per float micro-tile (8 x 3 = 24 accumulators)
constexpr int64_t kKc = 256;  // panel k rows: 3 blocks x 256 x 16 floats = 48 KiB (L1 + L2)

// The masked forms with every lane selected (the plain ones start from _mm512_undefined_*(),
// which GCC 12 reports as maybe-uninitialized; all-ones masks compile to the plain instruction).
inline __m512i widen(__m128i q) { return _mm512_maskz_cvtepi8_epi32(0xFFFF, q); }
inline __m128i quarter(__m512i v, int i) {
  switch (i) {
    case 1: return _mm512_maskz_extracti32x4_epi32(0xF, v, 1);
    case 2: return _mm512_maskz_extracti32x4_epi32(0xF, v, 2);
    case 3: return _mm512_maskz_extracti32x4_epi32(0xF, v, 3);
    default: return _mm512_maskz_extracti32x4_epi32(0xF, v, 0);
  }
}
inline __m512 bcast4(__m128 v) { return _mm512_maskz_broadcast_f32x4(0xFFFF, v); }

// The 16 column sums v of a block through the epilogue w8a16_value.
inline void store_f32(__m512 v, int64_t row, int64_t col, const W8Out& o) {
  v = _mm512_mul_ps(v, _mm512_loadu_ps(o.sw + col));
  if (o.bias) v = _mm512_add_ps(v, _mm512_loadu_ps(o.bias + col));
  _mm512_mask_storeu_ps(o.y + row * o.n + col, col_mask(col, o.n), v);
}

// ---- GEMV --------------------------------------------------------------------------------

// Lanes 4c + t of a[j] (column 4j + c, k = t mod 4) -> the 16 column sums in order.
inline __m512 reduce_quads(const __m512 (&a)[4]) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                         28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  auto pairs = [&](__m512 p, __m512 q) {
    return _mm512_add_ps(_mm512_permutex2var_ps(p, even, q), _mm512_permutex2var_ps(p, odd, q));
  };
  return pairs(pairs(a[0], a[1]), pairs(a[2], a[3]));
}

// Rows [row, row + R) (stride k) times one block: each code vector converted once for all rows.
template <int R>
void gemv_block(const float* x, const int8_t* w, int64_t k, int64_t row, int64_t col,
                const W8Out& o) {
  __m512 a[R][4];
#pragma GCC unroll 3
  for (int r = 0; r < R; ++r)
    for (auto& v : a[r]) v = _mm512_setzero_ps();
  auto step = [&](const int8_t* ws, const __m512 (&xx)[R]) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + 16 * j));
      const __m512 q = to_ps(widen(c));
#pragma GCC unroll 3
      for (int r = 0; r < R; ++r) a[r][j] = _mm512_fmadd_ps(q, xx[r], a[r][j]);
    }
  };
  const float* xr = x + row * k;
  const int64_t full = k / 4;
  for (int64_t s = 0; s < full; ++s) {
    _mm_prefetch(reinterpret_cast<const char*>(w + 64 * s + 1024), _MM_HINT_T0);
    __m512 xx[R];
#pragma GCC unroll 3
    for (int r = 0; r < R; ++r) xx[r] = bcast4(_mm_loadu_ps(xr + r * k + 4 * s));
    step(w + 64 * s, xx);
  }
  if (k % 4) {  // x beyond k is not read (it could be NaN; padding codes are 0)
    const __mmask8 m = static_cast<__mmask8>((1u << (k % 4)) - 1);
    __m512 xx[R];
#pragma GCC unroll 3
    for (int r = 0; r < R; ++r) xx[r] = bcast4(_mm_maskz_loadu_ps(m, xr + r * k + 4 * full));
    step(w + 64 * full, xx);
  }
#pragma GCC unroll 3
  for (int r = 0; r < R; ++r) store_f32(reduce_quads(a[r]), row + r, col, o);
}

// ---- panel -------------------------------------------------------------------------------

// Steps [0, kp/4) of a block -> panel[k][16] floats.
void dequant_panel(const int8_t* w, int64_t kp, float* panel) {
  // In each 128-bit lane (columns 4L .. 4L+3): bytes to [t][c] order; then dword t of every
  // lane gathered: 16 bytes per k = columns 0 .. 15.
  const int64_t lo = 0x0d0905010c080400, hi = 0x0f0b07030e0a0602;  // bytes 0 4 8 12 1 5 ...
  const __m512i shuf = _mm512_set4_epi64(hi, lo, hi, lo);
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int64_t s = 0; s < kp / 4; ++s) {
    const __m512i v = _mm512_maskz_permutexvar_epi32(
        0xFFFF, order, _mm512_shuffle_epi8(_mm512_loadu_si512(w + 64 * s), shuf));
    float* p = panel + 64 * s;
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) _mm512_store_ps(p + 16 * t, to_ps(widen(quarter(v, t))));
  }
}

// Rows [row, row + MR) x NR panels (stride kKc * 16) over panel rows [0, kn) (k offset kc).
// Accumulators start at 0 (first K block) or from cbuf (row stride 16 * kNrF), and go to cbuf,
// or through the epilogue after the last block.
template <int MR, int NR>
void tile_f32(const float* x, int64_t row, int64_t k, int64_t kc, int64_t kn, const float* panel,
              float* cbuf, bool first, bool last, int64_t col, const W8Out& o) {
  __m512 c[MR][NR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j)
      c[i][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(cbuf + 16 * (kNrF * i + j));
  const float* xr = x + row * k + kc;
  for (int64_t kk = 0; kk < kn; ++kk) {
    __m512 p[NR];
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) p[j] = _mm512_load_ps(panel + j * kKc * 16 + 16 * kk);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512 xb = _mm512_set1_ps(xr[i * k + kk]);
#pragma GCC unroll 3
      for (int j = 0; j < NR; ++j) c[i][j] = _mm512_fmadd_ps(p[j], xb, c[i][j]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) {
      if (last) store_f32(c[i][j], row + i, col + 16 * j, o);
      else _mm512_storeu_ps(cbuf + 16 * (kNrF * i + j), c[i][j]);
    }
}

template <int NR>
void rows_f32(const float* x, int64_t m0, int64_t m1, int64_t k, int64_t kc, int64_t kn,
              const float* panel, float* cbuf, bool first, bool last, int64_t col,
              const W8Out& o) {
  int64_t i = m0;
  auto tile = [&](auto mr) {
    constexpr int kMr = decltype(mr)::value;
    tile_f32<kMr, NR>(x, i, k, kc, kn, panel, cbuf + (i - m0) * 16 * kNrF, first, last, col, o);
    i += kMr;
  };
  while (i + kMrF <= m1) tile(std::integral_constant<int, kMrF>());
  if (m1 - i >= 4) tile(std::integral_constant<int, 4>());
  switch (m1 - i) {
    case 3: tile(std::integral_constant<int, 3>()); break;
    case 2: tile(std::integral_constant<int, 2>()); break;
    case 1: tile(std::integral_constant<int, 1>()); break;
    default: break;
  }
}

}  // namespace

void f32_avx512(const float* x, int64_t m0, int64_t m1, const int8_t* packed, int64_t k,
                int64_t b0, int64_t b1, const W8Out& out) {
  const int64_t kp = w8_padded_k(k), ws = kW8BlockN * kp;
  if (m1 - m0 <= kGemvRows) {
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* w = packed + b * ws;
      switch (m1 - m0) {
        case 3: gemv_block<3>(x, w, k, m0, b * kW8BlockN, out); break;
        case 2: gemv_block<2>(x, w, k, m0, b * kW8BlockN, out); break;
        default: gemv_block<1>(x, w, k, m0, b * kW8BlockN, out); break;
      }
    }
    return;
  }
  alignas(64) float panel[kNrF * kKc * kW8BlockN];
  thread_local AlignedVector<float> cbuf;
  const size_t need = static_cast<size_t>((m1 - m0) * kW8BlockN * kNrF);
  if (cbuf.size() < need) cbuf.resize(need);
  for (int64_t b = b0; b < b1; b += kNrF) {
    const int64_t nr = b1 - b < kNrF ? b1 - b : kNrF;
    for (int64_t kc = 0; kc < k; kc += kKc) {
      const int64_t kn = kc + kKc < k ? kKc : k - kc;
      for (int64_t j = 0; j < nr; ++j)
        dequant_panel(packed + (b + j) * ws + kc * kW8BlockN, w8_padded_k(kn),
                      panel + j * kKc * kW8BlockN);
      const bool first = kc == 0, last = kc + kKc >= k;
      auto rows = [&](auto nrc) {
        rows_f32<decltype(nrc)::value>(x, m0, m1, k, kc, kn, panel, cbuf.data(), first, last,
                                       b * kW8BlockN, out);
      };
      if (nr == 3) rows(std::integral_constant<int, 3>());
      else if (nr == 2) rows(std::integral_constant<int, 2>());
      else rows(std::integral_constant<int, 1>());
    }
  }
}

}  // namespace w8
}  // namespace qk
