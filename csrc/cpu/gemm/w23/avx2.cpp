// AVX2 2-bit / 3-bit matmul kernels. Same float32 operations in the same order as the scalar
// kernels (scalar.cpp), so both paths give identical bits. A packed vector is 8 rows
// (one 32-bit word per row, api.h), so every kernel works on 8 rows per vector and never
// needs a horizontal sum. A block's B words are read in "steps": B = 2: words 0, 1 (16 codes
// each); B = 3: words 0, 1, 2 (8 codes each) and two words assembled from the spare bits
// (4 codes each: low bits of words 0 / 1, high bits of word 2).
// - exact mode: (word & (mask << sh)) converts exactly to u * 2^sh; one FMA by 2^-sh gives
//   u - zc exactly; FMA chains run along k inside each group, 4 tiles at a time (M <= 3) or
//   from a k-major float buffer in a 5-row x 16-column register block (M > 3: each decoded
//   weight serves every row of the chunk).
// - fast mode: (word >> s) & 0x03 / 0x07 per byte gives four consecutive codes of every row;
//   maddubs with the broadcast 4 int8 activations they pair with, summed over the block, gives
//   each row's exact dot product in its own lane; the zero point comes off through the block's
//   code sum; then one FMA per block (x scale) and one per group (weight scale).
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu/gemm/tile/avx2.h"
#include "cpu/gemm/w23/geo.h"
#include "cpu/gemm/w23/kernels.h"

namespace qk {
namespace w23 {
namespace {

constexpr int64_t kPrefetch = 4096;  // bytes ahead in the packed stream of a tile

inline __m256i load(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// Step S's word of every row of the tile (geo.h); steps 3, 4 of B = 3 assembled in place.
template <int BITS, int S>
inline __m256i word(const uint8_t* blk) {
  if constexpr (BITS == 2 || S < 3) {
    return load(blk + 32 * S);
  } else {  // codes 24 + 4i + j in byte j: low bits from word i, high bit from word 2
    constexpr int i = S - 3;
    const __m256i lo = _mm256_and_si256(_mm256_srli_epi32(load(blk + 32 * i), 6),
                                        _mm256_set1_epi32(0x03030303));
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi32(load(blk + 64), 4 + i),
                                        _mm256_set1_epi32(0x04040404));
    return _mm256_or_si256(lo, hi);
  }
}

// float(u) - zc for the W-bit field at bit SH of every lane, exactly: masked in place u * 2^SH
// converts exactly (at most 3 significant bits) and one FMA by 2^-SH gives u - zc exactly.
template <int SH, int W>
inline __m256 field_minus(__m256i v, __m256 zc) {
  if constexpr (SH + W == 32) {
    return _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, SH)), zc);
  } else {
    const __m256 f = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(((1 << W) - 1) << SH)));
    if constexpr (SH == 0) return _mm256_sub_ps(f, zc);
    else return _mm256_fmsub_ps(f, _mm256_set1_ps(1.0f / static_cast<float>(1 << SH)), zc);
  }
}

// zc = float(-qmin) + float(z) of a tile's rows for one group (the float zero points if given).
inline __m256 code_offsets(const Problem& p, int64_t off) {
  if (p.zeros_f) return _mm256_loadu_ps(p.zeros_f + off);
  const __m256 zc0 = _mm256_set1_ps(p.zc0);
  if (!p.zeros) return zc0;
  const __m256i z = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.zeros + off));
  return _mm256_add_ps(zc0, _mm256_cvtepi32_ps(z));
}

// y[m, 8t .. 8t+8) = v (+ bias), rows past n dropped.
using tile_avx2::store_tile;
static_assert(kW23Rows == tile_avx2::kRows, "the shared tile code assumes 8-row tiles");

// The lines of one block kPrefetch bytes ahead (a 2-bit block is one 64-byte line).
template <int BITS>
inline void prefetch_block(const uint8_t* blk) {
  _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch), _MM_HINT_T0);
  if (BITS == 3) _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch + 64), _MM_HINT_T0);
}

// ---- exact mode --------------------------------------------------------------------------

// Row m, tiles [t, t + NT): NT independent FMA chains (one per tile, 8 rows each).
template <int BITS, int NT>
void exact_tiles_row(const Problem& p, int64_t t, int64_t m) {
  using G = Geo<BITS>;
  const int64_t nb = p.k / kW23Block, ng = p.k / p.group, bpg = p.group / kW23Block;
  const int64_t tbb = w23_tile_block_bytes(BITS);
  const float* x = p.x + m * p.k;
  __m256 y[NT];
  for (int j = 0; j < NT; ++j) y[j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m256 zc[NT], a[NT];
    for (int j = 0; j < NT; ++j) {
      zc[j] = code_offsets(p, ((t + j) * ng + g) * kW23Rows);
      a[j] = _mm256_setzero_ps();
    }
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const uint8_t* blk[NT];
      for (int j = 0; j < NT; ++j) {
        blk[j] = p.packed + ((t + j) * nb + b) * tbb;
        prefetch_block<BITS>(blk[j]);
      }
      const float* xk = x + b * kW23Block;
      static_for<G::kSteps>([&](auto s) {
        constexpr int S = decltype(s)::value;
        __m256i v[NT];
        for (int j = 0; j < NT; ++j) v[j] = word<BITS, S>(blk[j]);
        static_for<G::count(S)>([&](auto c) {
          constexpr int C = decltype(c)::value;
          const __m256 xb = _mm256_broadcast_ss(xk + G::first(S) + C);
          for (int j = 0; j < NT; ++j)
            a[j] = _mm256_fmadd_ps(xb, field_minus<G::shift(S, C), G::kWidth>(v[j], zc[j]), a[j]);
        });
      });
    }
    for (int j = 0; j < NT; ++j)
      y[j] = _mm256_fmadd_ps(_mm256_loadu_ps(p.scales + ((t + j) * ng + g) * kW23Rows), a[j],
                             y[j]);
  }
  for (int j = 0; j < NT; ++j) store_tile(p, m, t + j, y[j]);
}

// Groups [g0, g1) of tiles [t, t + nt) (nt <= 2) as k-major floats u - zc:
// w[(k - g0 * group) * 16 + 8 j + r] for row r of tile t + j.
template <int BITS>
void decode_cols(const Problem& p, int64_t t, int nt, int64_t g0, int64_t g1, float* w) {
  using G = Geo<BITS>;
  const int64_t nb = p.k / kW23Block, ng = p.k / p.group, bpg = p.group / kW23Block;
  const int64_t tbb = w23_tile_block_bytes(BITS);
  for (int j = 0; j < nt; ++j) {
    for (int64_t g = g0; g < g1; ++g) {
      const __m256 zc = code_offsets(p, ((t + j) * ng + g) * kW23Rows);
      for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
        const uint8_t* blk = p.packed + ((t + j) * nb + b) * tbb;
        float* d = w + (b * kW23Block - g0 * p.group) * 16 + 8 * j;
        static_for<G::kSteps>([&](auto s) {
          constexpr int S = decltype(s)::value;
          const __m256i v = word<BITS, S>(blk);
          static_for<G::count(S)>([&](auto c) {
            constexpr int C = decltype(c)::value;
            _mm256_storeu_ps(d + (G::first(S) + C) * 16,
                             field_minus<G::shift(S, C), G::kWidth>(v, zc));
          });
        });
      }
    }
  }
}

// Up to 3 rows: codes decoded on the fly, 4 tiles at a time, per row. More rows: pairs of
// tiles decoded once per chunk of groups (>= 256 k, L1-resident) into k-major floats, then
// 5 x 16 register blocks over the rows.
template <int BITS>
void exact_avx2(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (m1 - m0 < 4) {
    for (int64_t m = m0; m < m1; ++m) {
      int64_t t = t0;
      for (; t + 4 <= t1; t += 4) exact_tiles_row<BITS, 4>(p, t, m);
      for (; t < t1; ++t) exact_tiles_row<BITS, 1>(p, t, m);
    }
    return;
  }
  tile_avx2::exact_gemm(p, t0, t1, m0, m1,
                        [&p](int64_t t, int nt, int64_t g0, int64_t g1, float* w) {
                          decode_cols<BITS>(p, t, nt, g0, g1, w);
                        });
}

void exact_dispatch(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (p.bits == 2) exact_avx2<2>(p, t0, t1, m0, m1);
  else exact_avx2<3>(p, t0, t1, m0, m1);
}

// ---- fast mode ---------------------------------------------------------------------------

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Exact int32 sums u . xq of the tile's 8 rows over one block (row r in lane r). A maddubs
// pair is at most 2 * 7 * 127 = 1778 in magnitude; the int16 sum of eight, 14224 < 2^15.
template <int BITS>
inline __m256i block_dot(const uint8_t* blk, const int8_t* xq) {
  const __m256i mask = _mm256_set1_epi8(BITS == 2 ? 0x03 : 0x07);
  __m256i s = _mm256_setzero_si256();
  if constexpr (BITS == 2) {
    for (int i = 0; i < 2; ++i) {
      const __m256i v = load(blk + 32 * i);
      for (int q = 0; q < 4; ++q) {  // bits 2q of every byte: codes 16i + 4q .. +3
        const __m256i u = _mm256_and_si256(_mm256_srli_epi16(v, 2 * q), mask);
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(u, bcast4(xq + 16 * i + 4 * q)));
      }
    }
  } else {
    for (int i = 0; i < 3; ++i) {
      const __m256i v = load(blk + 32 * i);
      s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(v, mask), bcast4(xq + 8 * i)));
      s = _mm256_add_epi16(s, _mm256_maddubs_epi16(
                                  _mm256_and_si256(_mm256_srli_epi16(v, 3), mask),
                                  bcast4(xq + 8 * i + 4)));
    }
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(word<3, 3>(blk), bcast4(xq + 24)));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(word<3, 4>(blk), bcast4(xq + 28)));
  }
  return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}

// One tile, one row: per group acc = chain of fma(dx, du - zc * xs, acc), y = fma(scale, acc, y).
template <int BITS>
void fast_tile(const Problem& p, int64_t t, int64_t m) {
  const int64_t nb = p.k / kW23Block, ng = p.k / p.group, bpg = p.group / kW23Block;
  const int64_t tbb = w23_tile_block_bytes(BITS);
  const uint8_t* w = p.packed + t * nb * tbb;
  const int8_t* xq = p.xq + m * p.k;
  const float* dx = p.dx + m * nb;
  const float* xs = p.xs + m * nb;
  __m256 y = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const __m256 zc = code_offsets(p, (t * ng + g) * kW23Rows);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const uint8_t* blk = w + b * tbb;
      prefetch_block<BITS>(blk);
      const __m256 du = _mm256_cvtepi32_ps(block_dot<BITS>(blk, xq + b * kW23Block));
      acc = _mm256_fmadd_ps(_mm256_broadcast_ss(dx + b),
                            _mm256_fnmadd_ps(zc, _mm256_broadcast_ss(xs + b), du), acc);
    }
    y = _mm256_fmadd_ps(_mm256_loadu_ps(p.scales + (t * ng + g) * kW23Rows), acc, y);
  }
  store_tile(p, m, t, y);
}

// Each tile is streamed once per chunk of rows and stays cached while the rows use it.
template <int BITS>
void fast_avx2(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t m = m0; m < m1; ++m) fast_tile<BITS>(p, t, m);
}

void fast_dispatch(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (p.bits == 2) fast_avx2<2>(p, t0, t1, m0, m1);
  else fast_avx2<3>(p, t0, t1, m0, m1);
}

const Kernels kAvx2Kernels = {fast_dispatch, exact_dispatch, nullptr};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace w23
}  // namespace qk
