// AVX-512 (F/BW/VL/DQ + VNNI) int4 matmul kernels. Same float32 operations in the same order as
// the scalar kernels (scalar.cpp), so all paths give identical bits. Tiles are taken in pairs:
// the 32-byte packed vector i of tile t and the one of tile t + 1 make one 64-byte register, 16
// rows x 8 codes, one 32-bit lane per row (tile/avx512.h), so nothing needs a horizontal sum:
// - fast mode: vpdpbusd (u8 x s8 -> s32, exact) of the low / high nibbles with the broadcast
//   4 int8 activations they pair with (one broadcast load each) gives each row's
//   exact block dot product in its own lane; then the float epilogue of the definition on 16
//   rows at once. A block is decoded once (8 registers) for a register block of up to 8 rows.
//   The codebook mode (api.h table8) maps each nibble to its code with one vpshufb.
// - exact mode: code - zc as (2^23 + u) - (2^23 + zc): the nibble or'ed into the mantissa of
//   2^23 (one vpternlogd) and one subtraction give float(u) - zc exactly for integer offsets
//   (zero points in [-8, 7]; with float zero points: (2^23 + u) - 2^23 = u, then u - zf, the
//   definition's one rounding); FMA chains along k inside each group: M = 1 on 4 tile pairs
//   at a time, M = 2, 3 on 2 pairs with each code decoded once for all the rows; M >= 4 the
//   shared k-major GEMM (tile/avx512.h) with 8-row x 32-column register blocks.
// - quantize_x: two 16-float registers per block of 32.
//
// GCC 12's unmasked AVX-512 intrinsics start from _mm512_undefined_*() and report it as
// maybe-uninitialized once inlined (a false positive: every lane is written).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cfloat>
#include <cmath>
#include <utility>

#include "cpu/gemm/tile/avx2.h"
#include "cpu/gemm/tile/avx512.h"
#include "cpu/gemm/tile/exact_loop.h"
#include "cpu/gemm/tile/vnni_avx512.h"
#include "cpu/gemm/w4/kernels.h"

namespace qk {
namespace w4 {
namespace {

using tile_avx512::load_pair;
using tile_avx512::params_pair;
using tile_avx512::store_pair;
static_assert(kW4Rows == tile_avx512::kRows, "the shared tile code assumes 8-row tiles");

void quantize_x_avx512(const float* x, int64_t k, int64_t m0, int64_t m1, int8_t* xq, float* dx,
                       float* xs) {
  const int64_t nb = k / kW4Block;
  const __m512 fmax = _mm512_set1_ps(FLT_MAX);
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * k + b * kW4Block;
      int8_t* qb = xq + m * k + b * kW4Block;
      const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
      const __m512 a0 = _mm512_abs_ps(v0), a1 = _mm512_abs_ps(v1);
      const __mmask16 bad = _mm512_cmp_ps_mask(a0, fmax, _CMP_NLE_UQ) |  // NaN or Inf
                            _mm512_cmp_ps_mask(a1, fmax, _CMP_NLE_UQ);
      float d = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1)) / 127.0f;
      int32_t sum = 0;
      if (bad != 0 || d < FLT_MIN) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), _mm256_setzero_si256());
        d = bad != 0 ? NAN : 0.0f;
      } else {
        const __m512 r = _mm512_set1_ps(1.0f / d);
        __m512i q[2];
        const __m512 v[2] = {v0, v1};
        for (int i = 0; i < 2; ++i) {
          const __m512 t = _mm512_roundscale_ps(_mm512_mul_ps(v[i], r),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          q[i] = _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(t, lo), hi));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16 * i), _mm512_cvtepi32_epi8(q[i]));
        }
        sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
      }
      dx[m * nb + b] = d;
      xs[m * nb + b] = static_cast<float>(sum);
    }
  }
}

constexpr int64_t kPrefetch = 4096;  // bytes ahead in the packed stream of a tile
// The one-row GEMV streams its weights from memory: prefetched further ahead and into L2
// (measured on Zen 4, weights cold: 16 KiB / T1 ran 1.1-1.25x 4 KiB / T0).
constexpr int64_t kGemvPrefetch = 16384;

// (8 + z) of the pair's rows for group g, as float (the float zero points themselves if given).
inline __m512 code_offsets(const Problem& p, int64_t t, int nt, int64_t g) {
  return tile_avx512::offsets_pair(p.zeros_f, p.zeros, 8.0f, p.k / p.group, t, nt, g);
}

inline void prefetch_block(const uint8_t* blk) {
  _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch + 64), _MM_HINT_T0);
}

// ---- fast mode ---------------------------------------------------------------------------

// One block of a tile pair: lo[i] = the low nibbles u of packed vector i (codes 8i + j of every
// row in byte j of its lane), hi[i] = its high nibbles times 16 (codes 8i + 4 + j, in place:
// one AND each, no shift). kTable (the codebook mode, api.h): both nibbles shifted down and
// looked up in `tbl` (table8 in every 128-bit lane, one vpshufb each): the codes u = table8[c].
struct PairBlock {
  __m512i lo[4], hi[4];
};

template <bool kTable>
inline void decode_block(const uint8_t* b0, const uint8_t* b1, PairBlock& c, __m512i tbl) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  for (int i = 0; i < 4; ++i) {
    const __m512i v = load_pair(b0 + 32 * i, b1 + 32 * i);
    if (kTable) {
      c.lo[i] = _mm512_shuffle_epi8(tbl, _mm512_and_si512(v, mask));
      c.hi[i] = _mm512_shuffle_epi8(tbl, _mm512_and_si512(_mm512_srli_epi16(v, 4), mask));
    } else {
      c.lo[i] = _mm512_and_si512(v, mask);
      c.hi[i] = _mm512_andnot_si512(mask, v);
    }
  }
}

// table8 in every 128-bit lane (the codebook mode), or zeros.
inline __m512i table_lanes(const Problem& p) {
  if (!p.table8) return _mm512_setzero_si512();
  return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.table8)));
}

// Exact int32 sums u . xq over one block for the pair's 16 rows: the low nibbles' chain plus
// the high nibbles' chain (16 times their sum: |.| <= 16 * 16 * 15 * 127, the shift exact;
// with kTable the codes themselves, |.| <= 32 * 255 * 127).
template <bool kTable>
inline __m512i block_dot(const PairBlock& c, const int8_t* xq) {
  __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
  for (int i = 0; i < 4; ++i) {
    a = vnni::dpbusd_x4(a, c.lo[i], xq + 8 * i);
    b = vnni::dpbusd_x4(b, c.hi[i], xq + 8 * i + 4);
  }
  return _mm512_add_epi32(a, kTable ? b : _mm512_srai_epi32(b, 4));
}

// Rows [m, m + R) x tiles t .. t + nt - 1, group g: acc = chain of fma(dx, du - zc * xs, acc)
// over its blocks, then ys = fma(scale, acc, ys) (16 floats per row); each block decoded once
// for the R rows.
template <int R, bool kTable>
void fast_group(const Problem& p, int64_t m, int64_t t, int nt, int64_t g, float* ys) {
  const int64_t nb = p.k / kW4Block, ng = p.k / p.group, bpg = p.group / kW4Block;
  const int64_t tile_bytes = nb * kW4TileBlockBytes;
  const uint8_t* w0 = p.packed + t * tile_bytes;
  const uint8_t* w1 = w0 + (nt - 1) * tile_bytes;
  const int8_t* xq = p.xq + m * p.k;
  const float* dx = p.dx + m * nb;
  const float* xs = p.xs + m * nb;
  const __m512 zc = kTable ? _mm512_set1_ps(128.0f) : code_offsets(p, t, nt, g);
  const __m512i tbl = kTable ? table_lanes(p) : _mm512_setzero_si512();
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
    const uint8_t* b0 = w0 + b * kW4TileBlockBytes;
    const uint8_t* b1 = w1 + b * kW4TileBlockBytes;
    prefetch_block(b0);
    prefetch_block(b1);
    PairBlock c;
    decode_block<kTable>(b0, b1, c, tbl);
    for (int r = 0; r < R; ++r) {
      const __m512 du = _mm512_cvtepi32_ps(block_dot<kTable>(c, xq + r * p.k + b * kW4Block));
      const __m512 idot = _mm512_fnmadd_ps(zc, _mm512_set1_ps(xs[r * nb + b]), du);
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(dx[r * nb + b]), idot, acc[r]);
    }
  }
  const __m512 s = params_pair(p.scales, ng, t, nt, g);
  for (int r = 0; r < R; ++r)
    _mm512_storeu_ps(ys + 16 * r, _mm512_fmadd_ps(s, acc[r], _mm512_loadu_ps(ys + 16 * r)));
}

constexpr int kFastRows = 8;  // rows per register block

// ---- one row: a tile at a time in ymm ------------------------------------------------------
// A decode step's GEMV streams its weights from memory: one tile's contiguous bytes at a time
// (one stream, as the AVX2 kernel) measured faster from memory than a pair's two streams, so a
// single row runs AVX2's GEMV with VNNI in ymm (vpdpbusd replaces maddubs + madd; the sums are
// exact either way) and AVX2's float epilogue: the scalar order.

// (8 + z) of one tile's rows for group g (the float zero points themselves if given).
inline __m256 code_offsets_y(const Problem& p, int64_t off) {
  if (p.zeros_f) return _mm256_loadu_ps(p.zeros_f + off);
  const __m256 eight = _mm256_set1_ps(8.0f);
  if (!p.zeros) return eight;
  const __m256i z = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.zeros + off));
  return _mm256_add_ps(eight, _mm256_cvtepi32_ps(z));
}

template <bool kTable>
void gemv_tile_y(const Problem& p, int64_t t, int64_t m) {
  const int64_t nb = p.k / kW4Block, ng = p.k / p.group, bpg = p.group / kW4Block;
  const uint8_t* w = p.packed + t * nb * kW4TileBlockBytes;
  const int8_t* xq = p.xq + m * p.k;
  const float* dx = p.dx + m * nb;
  const float* xs = p.xs + m * nb;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i tbl = kTable ? _mm512_castsi512_si256(table_lanes(p)) : _mm256_setzero_si256();
  __m256 y = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const __m256 zc =
        kTable ? _mm256_set1_ps(128.0f) : code_offsets_y(p, (t * ng + g) * kW4Rows);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const uint8_t* blk = w + b * kW4TileBlockBytes;
      _mm_prefetch(reinterpret_cast<const char*>(blk + kGemvPrefetch), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(blk + kGemvPrefetch + 64), _MM_HINT_T1);
      const int8_t* xb = xq + b * kW4Block;
      __m256i d[4];  // four independent vpdpbusd chains (exact int32 sums: any order)
      for (int i = 0; i < 4; ++i) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * i));
        __m256i cl = _mm256_and_si256(v, mask);
        __m256i ch = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        if (kTable) {  // the codes u = table8[c] (vpshufb per 128-bit lane)
          cl = _mm256_shuffle_epi8(tbl, cl);
          ch = _mm256_shuffle_epi8(tbl, ch);
        }
        const __m256i lo = vnni::dpbusd_x4(_mm256_setzero_si256(), cl, xb + 8 * i);
        d[i] = vnni::dpbusd_x4(lo, ch, xb + 8 * i + 4);
      }
      const __m256 du = _mm256_cvtepi32_ps(
          _mm256_add_epi32(_mm256_add_epi32(d[0], d[1]), _mm256_add_epi32(d[2], d[3])));
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(dx + b),
                            _mm256_fnmadd_ps(zc, _mm256_broadcast_ss(xs + b), du), acc);
    }
    y = _mm256_fmadd_ps(_mm256_loadu_ps(p.scales + (t * ng + g) * kW4Rows), acc, y);
  }
  tile_avx2::store_tile(p, m, t, y);  // y[m, 8t .. 8t+8) (+ bias), rows past n dropped
}

// Tile pairs x chunks of groups (the pair's weights of a chunk stay in L1) x blocks of rows
// (tile/exact_loop.h; the fast mode has nothing to decode ahead). The decoding (4 loads, 8
// ANDs) is shared by the rows; each row then costs 8 vpdpbusd per 512 multiply-adds, the
// limit of the VNNI unit from M = 8 on.
template <bool kTable>
void fast_impl(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (m1 - m0 == 1) {
    for (int64_t t = t0; t < t1; ++t) gemv_tile_y<kTable>(p, t, m0);
    return;
  }
  using Fn = void (*)(const Problem&, int64_t, int64_t, int, int64_t, float*);
  static constexpr Fn kFns[kFastRows] = {
      fast_group<1, kTable>, fast_group<2, kTable>, fast_group<3, kTable>, fast_group<4, kTable>,
      fast_group<5, kTable>, fast_group<6, kTable>, fast_group<7, kTable>, fast_group<8, kTable>};
  tile_loop::pairs_by_groups<kFastRows>(
      p, t0, t1, m0, m1, [](int64_t, int, int64_t, int64_t, float*) {},
      [&p](int64_t m, int rows, int64_t t, int nt, int64_t g, const float*, float* ys) {
        kFns[rows - 1](p, m, t, nt, g, ys);
      },
      [&p](int64_t m, int64_t t, int nt, const float* ys) {
        store_pair(p, m, t, nt, _mm512_loadu_ps(ys));
      });
}

void fast_avx512(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (p.table8) fast_impl<true>(p, t0, t1, m0, m1);
  else fast_impl<false>(p, t0, t1, m0, m1);
}

// ---- exact mode --------------------------------------------------------------------------
// Inside a group, k runs over block b, word vector i, code c: k = 32 b + 8 i + c.

// float(u) - zc of code 8i + C (the nibble at bit sh = 8 (C % 4) + 4 (C / 4)) of the pair's 16
// rows: u or'ed into the mantissa of 2^23 gives 2^23 + u; off = 2^23 + zc for integer offsets
// (both exact: the difference is u - zc exactly), or 2^23 with float zero points zf (then
// the exact u minus zf, one rounding as in the definition).
template <int C, bool kFloatZeros>
inline __m512 code_minus(__m512i v, __m512 off, __m512 zf) {
  constexpr int kShift = 8 * (C % 4) + 4 * (C / 4);
  const __m512i s = kShift == 0 ? v : _mm512_srli_epi32(v, kShift);
  const __m512i bits = _mm512_ternarylogic_epi32(s, _mm512_set1_epi32(15),
                                                 _mm512_set1_epi32(0x4B000000), 0xEA);
  const __m512 d = _mm512_sub_ps(_mm512_castsi512_ps(bits), off);
  return kFloatZeros ? _mm512_sub_ps(d, zf) : d;
}

// The pair's (off, zf) of code_minus for group g.
template <bool kFloatZeros>
inline void offsets(const Problem& p, int64_t t, int nt, int64_t g, __m512& off, __m512& zf) {
  const __m512 two23 = _mm512_set1_ps(8388608.0f);
  zf = code_offsets(p, t, nt, g);
  off = kFloatZeros ? two23 : _mm512_add_ps(two23, zf);
}

// f(std::integral_constant<int, C>{}) for C = 0..7, in order.
template <typename F, int... C>
inline void for_codes(F&& f, std::integer_sequence<int, C...>) {
  (f(std::integral_constant<int, C>{}), ...);
}
template <typename F>
inline void for_codes(F&& f) { for_codes(f, std::make_integer_sequence<int, 8>{}); }

// Rows [m, m + R), NP tile pairs from t (the last one nt_last tiles): each code decoded once
// for the R rows, NP x R independent FMA chains.
template <int NP, int R, bool kFloatZeros>
void exact_pairs_rows(const Problem& p, int64_t t, int nt_last, int64_t m) {
  const int64_t nb = p.k / kW4Block, ng = p.k / p.group, bpg = p.group / kW4Block;
  const int64_t tile_bytes = nb * kW4TileBlockBytes;
  const float* x = p.x + m * p.k;
  const uint8_t* w0[NP];
  const uint8_t* w1[NP];
  int nt[NP];
  __m512 y[NP][R];
  for (int j = 0; j < NP; ++j) {
    nt[j] = j + 1 < NP ? 2 : nt_last;
    w0[j] = p.packed + (t + 2 * j) * tile_bytes;
    w1[j] = w0[j] + (nt[j] - 1) * tile_bytes;
    for (int r = 0; r < R; ++r) y[j][r] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < ng; ++g) {
    __m512 off[NP], zf[NP], a[NP][R];
    for (int j = 0; j < NP; ++j) {
      offsets<kFloatZeros>(p, t + 2 * j, nt[j], g, off[j], zf[j]);
      for (int r = 0; r < R; ++r) a[j][r] = _mm512_setzero_ps();
    }
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      for (int j = 0; j < NP; ++j) {
        prefetch_block(w0[j] + b * kW4TileBlockBytes);
        prefetch_block(w1[j] + b * kW4TileBlockBytes);
      }
      for (int i = 0; i < 4; ++i) {
        __m512i v[NP];
        for (int j = 0; j < NP; ++j)
          v[j] = load_pair(w0[j] + b * kW4TileBlockBytes + 32 * i,
                           w1[j] + b * kW4TileBlockBytes + 32 * i);
        const float* xk = x + b * kW4Block + 8 * i;
        for_codes([&](auto c) {
          for (int j = 0; j < NP; ++j) {
            const __m512 wv = code_minus<c(), kFloatZeros>(v[j], off[j], zf[j]);
            for (int r = 0; r < R; ++r)
              a[j][r] = _mm512_fmadd_ps(_mm512_set1_ps(xk[r * p.k + c()]), wv, a[j][r]);
          }
        });
      }
    }
    for (int j = 0; j < NP; ++j) {
      const __m512 s = params_pair(p.scales, ng, t + 2 * j, nt[j], g);
      for (int r = 0; r < R; ++r) y[j][r] = _mm512_fmadd_ps(s, a[j][r], y[j][r]);
    }
  }
  for (int j = 0; j < NP; ++j)
    for (int r = 0; r < R; ++r) store_pair(p, m + r, t + 2 * j, nt[j], y[j][r]);
}

// Rows [m, m + R), tiles [t0, t1): NP pairs at a time, then the rest one pair at a time.
template <int NP, int R, bool kFloatZeros>
void exact_small(const Problem& p, int64_t t0, int64_t t1, int64_t m) {
  int64_t t = t0;
  for (; t + 2 * NP <= t1; t += 2 * NP) exact_pairs_rows<NP, R, kFloatZeros>(p, t, 2, m);
  for (; t < t1; t += 2) exact_pairs_rows<1, R, kFloatZeros>(p, t, t + 1 < t1 ? 2 : 1, m);
}

// Groups [g0, g1) of tiles [t, t + nt) as k-major floats u - zc (tile/avx512.h's decode):
// w[(k - g0 * group) * 16 + 8 j + r] for row r of tile t + j.
template <bool kFloatZeros>
void decode_cols(const Problem& p, int64_t t, int nt, int64_t g0, int64_t g1, float* w) {
  const int64_t nb = p.k / kW4Block, bpg = p.group / kW4Block;
  const uint8_t* w0 = p.packed + t * nb * kW4TileBlockBytes;
  const uint8_t* w1 = w0 + (nt - 1) * nb * kW4TileBlockBytes;
  for (int64_t g = g0; g < g1; ++g) {
    __m512 off, zf;
    offsets<kFloatZeros>(p, t, nt, g, off, zf);
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      for (int i = 0; i < 4; ++i) {
        const __m512i v = load_pair(w0 + b * kW4TileBlockBytes + 32 * i,
                                    w1 + b * kW4TileBlockBytes + 32 * i);
        float* d = w + (b * kW4Block + 8 * i - g0 * p.group) * 16;
        for_codes([&](auto c) {
          _mm512_storeu_ps(d + c() * 16, code_minus<c(), kFloatZeros>(v, off, zf));
        });
      }
    }
  }
}

// Up to 3 rows: codes decoded on the fly, once for all the rows, 4 (1 row) or 2 tile pairs at a
// time. More rows: tile pairs decoded once per chunk of groups into k-major floats, then 8 x 16
// register blocks.
template <bool kFloatZeros>
void exact_impl(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  switch (m1 - m0) {
    case 1: return exact_small<4, 1, kFloatZeros>(p, t0, t1, m0);
    case 2: return exact_small<2, 2, kFloatZeros>(p, t0, t1, m0);
    case 3: return exact_small<2, 3, kFloatZeros>(p, t0, t1, m0);
    default:
      tile_avx512::exact_gemm(p, t0, t1, m0, m1,
                              [&p](int64_t t, int nt, int64_t g0, int64_t g1, float* w) {
                                decode_cols<kFloatZeros>(p, t, nt, g0, g1, w);
                              });
  }
}

void exact_avx512(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (p.zeros_f) exact_impl<true>(p, t0, t1, m0, m1);
  else exact_impl<false>(p, t0, t1, m0, m1);
}

const Kernels kAvx512Kernels = {quantize_x_avx512, fast_avx512, exact_avx512,
                                   nullptr};

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace w4
}  // namespace qk
