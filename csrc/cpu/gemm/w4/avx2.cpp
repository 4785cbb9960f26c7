// AVX2 int4 matmul kernels. Same float32 operations in the same order as the scalar kernels
// (scalar.cpp), so both paths give identical bits. A packed vector is 8 rows x 8 codes
// (one 32-bit word per row, api.h), so every kernel works on 8 rows per vector and never
// needs a horizontal sum:
// - fast mode: the low / high nibbles times the broadcast 4 int8 activations they pair with
//   (maddubs, u8 x s8 -> s16) summed over the block give each row's exact dot product in its
//   own lane; the zero point and the +8 bias come off through the block's code sum; then one
//   FMA per block (x scale) and one per group (weight scale); the codebook mode (api.h
//   table8) looks each nibble up with one vpshufb first. Weights are decoded on the fly
//   (software prefetch ahead); for M > 1 each tile stays cached across a chunk of rows.
// - exact mode: (word & (15 << sh)) converts exactly to u * 2^sh; one FMA by 2^-sh gives
//   u - (8 + z) exactly; FMA chains run along k inside each group, 4 tiles at a time (M = 1)
//   or from a k-major float buffer in a 5-row x 16-column register block (M > 1).
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <utility>
#include <vector>

#include "cpu/gemm/tile/avx2.h"
#include "cpu/gemm/w4/kernels.h"

namespace qk {
namespace w4 {
namespace {

inline float hmax8(__m256 v) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_max_ss(a, _mm_shuffle_ps(a, a, 1)));
}

inline int32_t hsum8i(__m256i v) {
  __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  a = _mm_add_epi32(a, _mm_unpackhi_epi64(a, a));
  return _mm_cvtsi128_si32(_mm_add_epi32(a, _mm_shuffle_epi32(a, 1)));
}

void quantize_x_avx2(const float* x, int64_t k, int64_t m0, int64_t m1, int8_t* xq, float* dx,
                     float* xs) {
  const int64_t nb = k / kW4Block;
  const __m256 sign = _mm256_set1_ps(-0.0f), fmax = _mm256_set1_ps(FLT_MAX);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * k + b * kW4Block;
      __m256i* qb = reinterpret_cast<__m256i*>(xq + m * k + b * kW4Block);
      __m256 v[4], amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        __m256 a = _mm256_andnot_ps(sign, v[i]);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, fmax, _CMP_NLE_UQ));  // NaN or Inf
        amax = _mm256_max_ps(amax, a);
      }
      float d = hmax8(amax) / 127.0f;
      int32_t sum = 0;
      if (_mm256_movemask_ps(bad) != 0 || d < FLT_MIN) {
        _mm256_storeu_si256(qb, _mm256_setzero_si256());
        d = _mm256_movemask_ps(bad) != 0 ? NAN : 0.0f;
      } else {
        const __m256 r = _mm256_set1_ps(1.0f / d);
        __m256i q[4];
        for (int i = 0; i < 4; ++i) {
          __m256 t = _mm256_round_ps(_mm256_mul_ps(v[i], r),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          q[i] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(t, lo), hi));
        }
        sum = hsum8i(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                       _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256(qb, _mm256_permutevar8x32_epi32(p, order));
      }
      dx[m * nb + b] = d;
      xs[m * nb + b] = static_cast<float>(sum);
    }
  }
}

// ---- fast mode ---------------------------------------------------------------------------

constexpr int64_t kPrefetch = 4096;  // bytes ahead in the packed stream of a tile (measured)

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// (8 + z) of a tile's rows for one group, as float (the float zero points themselves if given).
inline __m256 code_offsets(const Problem& p, int64_t off) {
  if (p.zeros_f) return _mm256_loadu_ps(p.zeros_f + off);
  const int32_t* zeros = p.zeros;
  const __m256 eight = _mm256_set1_ps(8.0f);
  if (!zeros) return eight;
  __m256i z = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(zeros + off));
  return _mm256_add_ps(eight, _mm256_cvtepi32_ps(z));
}

// y[m, 8t .. 8t+8) = v (+ bias), rows past n dropped.
using tile_avx2::store_tile;
static_assert(kW4Rows == tile_avx2::kRows, "the shared tile code assumes 8-row tiles");

// GEMV: exact int32 sums u . xq of the tile's 8 rows over one block (row n in lane n),
// decoded from the 128 packed bytes. A maddubs pair is at most 2 * 15 * 127 = 3810 in
// magnitude, the int16 sum of eight 30480 < 2^15.
// kTable (the codebook mode, api.h): each nibble is looked up in `tbl` (the signed t8 =
// table8 - 128 in both 128-bit lanes, one vpshufb) and the block's sum t8 . xq comes from
// maddubs(|t8|, sign(xq, t8)) (a pair at most 2 * 127 * 127 < 2^15), each widened by madd to
// int32 before any further sum: exact. That is u . xq - 128 * sum(xq) already, so
// the caller's offset is 0: the float value du - zc * xs of the definition is the same integer.
template <bool kTable>
inline __m256i gemv_block_dot(const uint8_t* blk, const int8_t* xq, __m256i tbl) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256i p[4];
  for (int i = 0; i < 4; ++i) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * i));
    const __m256i lo = _mm256_and_si256(v, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    if (kTable) {
      const __m256i wl = _mm256_shuffle_epi8(tbl, lo), wh = _mm256_shuffle_epi8(tbl, hi);
      const __m256i xl = bcast4(xq + 8 * i), xh = bcast4(xq + 8 * i + 4);
      const __m256i one = _mm256_set1_epi16(1);
      p[i] = _mm256_add_epi32(
          _mm256_madd_epi16(
              _mm256_maddubs_epi16(_mm256_sign_epi8(wl, wl), _mm256_sign_epi8(xl, wl)), one),
          _mm256_madd_epi16(
              _mm256_maddubs_epi16(_mm256_sign_epi8(wh, wh), _mm256_sign_epi8(xh, wh)), one));
    } else {
      p[i] = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(xq + 8 * i)),
                              _mm256_maddubs_epi16(hi, bcast4(xq + 8 * i + 4)));
    }
  }
  if (kTable)  // int32 partial sums already
    return _mm256_add_epi32(_mm256_add_epi32(p[0], p[1]), _mm256_add_epi32(p[2], p[3]));
  const __m256i s = _mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3]));
  return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}

// GEMV, one tile: per group acc = chain of fma(dx, du - zc * xs, acc), y = fma(scale, acc, y).
template <bool kTable>
void gemv_tile(const Problem& p, int64_t t, int64_t m, __m256i tbl) {
  const int64_t nb = p.k / kW4Block, ng = p.k / p.group, bpg = p.group / kW4Block;
  const uint8_t* w = p.packed + t * nb * kW4TileBlockBytes;
  const int8_t* xq = p.xq + m * p.k;
  const float* dx = p.dx + m * nb;
  const float* xs = p.xs + m * nb;
  __m256 y = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const __m256 zc = kTable ? _mm256_setzero_ps() : code_offsets(p, (t * ng + g) * kW4Rows);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const uint8_t* blk = w + b * kW4TileBlockBytes;  // the hardware prefetcher falls behind
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch + 64), _MM_HINT_T0);
      const __m256 du =
          _mm256_cvtepi32_ps(gemv_block_dot<kTable>(blk, xq + b * kW4Block, tbl));
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(dx + b),
                            _mm256_fnmadd_ps(zc, _mm256_broadcast_ss(xs + b), du), acc);
    }
    y = _mm256_fmadd_ps(_mm256_loadu_ps(p.scales + (t * ng + g) * kW4Rows), acc, y);
  }
  store_tile(p, m, t, y);
}

// Each tile is streamed once per chunk of rows and stays cached while the rows use it: the
// kernel is bound by maddubs throughput, so splitting nibbles once for several rows (tried:
// 2 rows x 2 tiles blocks) measured no faster than decoding per row.
void fast_avx2(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (p.table8) {  // the signed table t8 = table8 - 128 in both lanes
    const __m128i t8 = _mm_xor_si128(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.table8)), _mm_set1_epi8(-128));
    const __m256i tbl = _mm256_broadcastsi128_si256(t8);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t m = m0; m < m1; ++m) gemv_tile<true>(p, t, m, tbl);
    return;
  }
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t m = m0; m < m1; ++m) gemv_tile<false>(p, t, m, _mm256_setzero_si256());
}

// ---- exact mode --------------------------------------------------------------------------
// Inside a group, k runs over block b, word vector i, code c: k = 32 b + 8 i + c.

// float(u) - zc for code 8i + C of every row of a packed vector (C = 0..7, the nibble at bit
// sh = 8 (C % 4) + 4 (C / 4)): masked in place, u * 2^sh converts exactly and one FMA by
// 2^-sh gives u - zc exactly (small integers).
template <int C>
inline __m256 code_minus(__m256i v, __m256 zc) {
  constexpr int kShift = 8 * (C % 4) + 4 * (C / 4);
  if (kShift == 28) return _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28)), zc);
  __m256 f = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15 << kShift)));
  if (kShift == 0) return _mm256_sub_ps(f, zc);
  return _mm256_fmsub_ps(f, _mm256_set1_ps(1.0f / static_cast<float>(1 << kShift)), zc);
}

// f(std::integral_constant<int, C>{}) for C = 0..7, in order.
template <typename F, int... C>
inline void for_codes(F&& f, std::integer_sequence<int, C...>) {
  (f(std::integral_constant<int, C>{}), ...);
}
template <typename F>
inline void for_codes(F&& f) { for_codes(f, std::make_integer_sequence<int, 8>{}); }

// Row m, tiles [t, t + NT): NT independent FMA chains (one per tile, 8 rows each).
template <int NT>
void exact_tiles_row(const Problem& p, int64_t t, int64_t m) {
  const int64_t nb = p.k / kW4Block, ng = p.k / p.group, bpg = p.group / kW4Block;
  const float* x = p.x + m * p.k;
  __m256 y[NT];
  for (int j = 0; j < NT; ++j) y[j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m256 zc[NT], a[NT];
    for (int j = 0; j < NT; ++j) {
      zc[j] = code_offsets(p, ((t + j) * ng + g) * kW4Rows);
      a[j] = _mm256_setzero_ps();
    }
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      for (int j = 0; j < NT; ++j) {
        const char* pf = reinterpret_cast<const char*>(
            p.packed + ((t + j) * nb + b) * kW4TileBlockBytes + kPrefetch);
        _mm_prefetch(pf, _MM_HINT_T0);
        _mm_prefetch(pf + 64, _MM_HINT_T0);
      }
      for (int i = 0; i < 4; ++i) {
        __m256i v[NT];
        for (int j = 0; j < NT; ++j)
          v[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
              p.packed + ((t + j) * nb + b) * kW4TileBlockBytes + 32 * i));
        const float* xk = x + b * kW4Block + 8 * i;
        for_codes([&](auto c) {
          const __m256 xb = _mm256_broadcast_ss(xk + c());
          for (int j = 0; j < NT; ++j)
            a[j] = _mm256_fmadd_ps(xb, code_minus<c()>(v[j], zc[j]), a[j]);
        });
      }
    }
    for (int j = 0; j < NT; ++j)
      y[j] = _mm256_fmadd_ps(_mm256_loadu_ps(p.scales + ((t + j) * ng + g) * kW4Rows), a[j], y[j]);
  }
  for (int j = 0; j < NT; ++j) store_tile(p, m, t + j, y[j]);
}

// Groups [g0, g1) of tiles [t, t + nt) (nt <= 2) as k-major floats u - zc:
// w[(k - g0 * group) * 16 + 8 j + r] for row r of tile t + j.
void decode_cols(const Problem& p, int64_t t, int nt, int64_t g0, int64_t g1, float* w) {
  const int64_t nb = p.k / kW4Block, ng = p.k / p.group, bpg = p.group / kW4Block;
  for (int j = 0; j < nt; ++j) {
    for (int64_t g = g0; g < g1; ++g) {
      const __m256 zc = code_offsets(p, ((t + j) * ng + g) * kW4Rows);
      for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
        for (int i = 0; i < 4; ++i) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
              p.packed + ((t + j) * nb + b) * kW4TileBlockBytes + 32 * i));
          float* d = w + (b * kW4Block + 8 * i - g0 * p.group) * 16 + 8 * j;
          for_codes([&](auto c) { _mm256_storeu_ps(d + c() * 16, code_minus<c()>(v, zc)); });
        }
      }
    }
  }
}

// Up to 3 rows: codes decoded on the fly, 4 tiles at a time, per row (fewer rows give the
// blocked kernel too few independent FMA chains). More rows: pairs of tiles decoded once per
// chunk of groups (>= 256 k, L1-resident) into k-major floats, then 5 x 16 blocks.
void exact_avx2(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (m1 - m0 < 4) {
    for (int64_t m = m0; m < m1; ++m) {
      int64_t t = t0;
      for (; t + 4 <= t1; t += 4) exact_tiles_row<4>(p, t, m);
      for (; t < t1; ++t) exact_tiles_row<1>(p, t, m);
    }
    return;
  }
  tile_avx2::exact_gemm(p, t0, t1, m0, m1,
                        [&p](int64_t t, int nt, int64_t g0, int64_t g1, float* w) {
                          decode_cols(p, t, nt, g0, g1, w);
                        });
}

const Kernels kAvx2Kernels = {quantize_x_avx2, fast_avx2, exact_avx2, nullptr};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace w4
}  // namespace qk
