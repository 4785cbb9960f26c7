// AVX2 kernels of the binary / ternary matmuls (see api.h).
//
// Float activations by table lookup (the LUT-GEMM / T-MAC idea, in float32): for every group
// of 3 consecutive activations the 8 sums s0 x0 + s1 x1 + s2 x2 are built once per call
// (binary: s in {+1, -1}, entry c has s_i = -1 where bit i of c is set; ternary: s in {0, 1},
// subset sums), a 32-byte table per group shared by every weight row. A weight vector holds
// one 30-bit word per row of an 8-row tile (lane-per-row), so `word >> 3j` is an index vector
// of 8 rows' patterns for group j and one vpermps fetches their 8 partial sums: per 8 rows x 3
// weights a shift, a permute (table operand from memory) and an add (ternary: twice, P added
// and Q subtracted). No horizontal sums; up to 8 activation rows share each index vector.
// One activation row costs 29 vector ops per block (8 rows x 30 weights), against 120 for the
// sign-flip loop this replaced (shift, and, xor, add per 8 weights); on Zen 5 that is ~8
// cycles per block, bound by the 4 vector pipes. Fewer ops per weight would need wider
// tables: 16 entries take two permutes and a blend in AVX2 (AVX-512 has vpermt2ps).
// XNOR: popcount of (xbits ^ wbits) per row lane with the pshufb nibble table (AVX2 has no
// vector popcount), byte counts widened to 32 bits every 31 blocks; bits 30, 31 and k >= K
// are masked as the scalar kernel masks them, so the integer results are identical.
#include <immintrin.h>

#include <algorithm>
#include <utility>

#include "cpu/gemm/bits/kernels.h"
#include "cpu/gemm/bits/xnor_tiles.h"

namespace qk {
namespace bits {
namespace {

// Software prefetch distance over the packed weights, in bytes: without it a cold GEMV (weights
// from DRAM, the decode case) measured 2.2x slower than a hot one for one row of 4096 x 4096
// binary (the hardware prefetcher falls behind); 8 KiB ahead leaves ~6%.
constexpr int64_t kPrefetch = 8192;

// Lane c of the table-building masks: bit i of c.
struct TableConsts {
  __m256i bit[3];   // all ones where bit i of the lane index is set
  __m256 sign[3];   // -0.0 where bit i is set
  TableConsts() {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i one = _mm256_set1_epi32(1);
    for (int i = 0; i < 3; ++i) {
      __m256i b = _mm256_and_si256(_mm256_srli_epi32(lane, i), one);
      bit[i] = _mm256_cmpeq_epi32(b, one);
      sign[i] = _mm256_castsi256_ps(_mm256_slli_epi32(b, 31));
    }
  }
};

template <bool kTernary>
inline __m256 term(float v, const TableConsts& c, int i) {
  const __m256 b = _mm256_set1_ps(v);
  return kTernary ? _mm256_and_ps(b, _mm256_castsi256_ps(c.bit[i])) : _mm256_xor_ps(b, c.sign[i]);
}

// Entry c of group g: (t0 + t1) + t2 with t_i = +-x[3g + i] (binary) or x or 0 (ternary).
template <bool kTernary>
void tables_impl(const float* x, int64_t K, float* tab) {
  const TableConsts c;
  const int64_t Kb = bits_blocks(K);
  float last[kBitsBlock] = {};
  std::copy(x + kBitsBlock * (Kb - 1), x + K, last);
  for (int64_t h = 0; h < Kb; ++h) {
    const float* xb = h + 1 < Kb ? x + kBitsBlock * h : last;
    float* tb = tab + kBitsGroups * 8 * h;
    for (int j = 0; j < kBitsGroups; ++j) {
      const float* g = xb + 3 * j;
      __m256 t = _mm256_add_ps(term<kTernary>(g[0], c, 0), term<kTernary>(g[1], c, 1));
      _mm256_store_ps(tb + 8 * j, _mm256_add_ps(t, term<kTernary>(g[2], c, 2)));
    }
  }
}

void tables_avx2(const float* x, int64_t K, bool ternary, float* tab) {
  if (ternary) tables_impl<true>(x, K, tab);
  else tables_impl<false>(x, K, tab);
}

// MT activation rows times one 8-row tile: out[r] lane i = sum over k of row 8t + i.
//
// The partial sums are accumulated with FMA by 1.0: fma(p, 1, acc) = acc + p exactly (p * 1
// is exact, one rounding), but it issues on the FMA pipes, while on Zen 5 FP adds share two
// pipes with the vector shifts (measured: 7.7 instead of 11.7 cycles per block for one row).
// C chains per row hide the FMA latency.
template <int MT, bool kTernary>
struct TileDot {
  static constexpr int C = MT == 1 ? kBitsGroups : MT == 2 ? 5 : MT == 4 ? 2 : 1;
  static constexpr int64_t kVec = kTernary ? 64 : 32;  // bytes per block

  template <int J>
  static inline void group(const __m256i wp, const __m256i wq, const float* const* tb,
                           __m256 one, __m256 (&acc)[MT][C]) {
    const __m256i ip = J == 0 ? wp : _mm256_srli_epi32(wp, 3 * J);
    for (int r = 0; r < MT; ++r) {
      const __m256 p = _mm256_permutevar8x32_ps(_mm256_load_ps(tb[r] + 8 * J), ip);
      acc[r][J % C] = _mm256_fmadd_ps(p, one, acc[r][J % C]);
    }
    if (kTernary) {  // acc - q: the Q plane's subset sums
      const __m256i iq = J == 0 ? wq : _mm256_srli_epi32(wq, 3 * J);
      for (int r = 0; r < MT; ++r) {
        const __m256 q = _mm256_permutevar8x32_ps(_mm256_load_ps(tb[r] + 8 * J), iq);
        acc[r][J % C] = _mm256_fnmadd_ps(q, one, acc[r][J % C]);
      }
    }
  }

  template <int... J>
  static inline void block(const __m256i wp, const __m256i wq, const float* const* tb,
                           __m256 one, __m256 (&acc)[MT][C], std::integer_sequence<int, J...>) {
    (group<J>(wp, wq, tb, one, acc), ...);
  }

  static inline void run(const float* const* tab, const uint8_t* wt, int64_t Kb, __m256* out) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 acc[MT][C];
    for (int r = 0; r < MT; ++r)
      for (int k = 0; k < C; ++k) acc[r][k] = _mm256_setzero_ps();
    for (int64_t h = 0; h < Kb; ++h) {
      const uint8_t* v = wt + kVec * h;
      _mm_prefetch(reinterpret_cast<const char*>(v + kPrefetch), _MM_HINT_T0);
      if (kTernary) _mm_prefetch(reinterpret_cast<const char*>(v + kPrefetch + 32), _MM_HINT_T0);
      const __m256i wp = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
      const __m256i wq = kTernary ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32))
                                  : wp;
      const float* tb[MT];
      for (int r = 0; r < MT; ++r) tb[r] = tab[r] + kBitsGroups * 8 * h;
      block(wp, wq, tb, one, acc, std::make_integer_sequence<int, kBitsGroups>{});
    }
    for (int r = 0; r < MT; ++r) {  // pairwise
      __m256 s[C];
      for (int k = 0; k < C; ++k) s[k] = acc[r][k];
      for (int w = 1; w < C; w *= 2)
        for (int k = 0; k + w < C; k += 2 * w) s[k] = _mm256_add_ps(s[k], s[k + w]);
      out[r] = s[0];
    }
  }
};

// Rows in batches of 8, then 4, 2, 1: fixed by M alone (the splits over threads cut at
// multiples of 8), so results do not depend on the thread count. Each batch passes over the
// tiles [t0, t1) with its tables in L1 or L2 (a K-chunked loop keeping them in L1 measured no
// faster, and slower for one row).
template <bool kTernary>
void float_tiles_impl(const FloatProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  const int64_t Kb = bits_blocks(p.K), tf = table_floats(p.K);
  const int64_t tile_bytes = Kb * (kTernary ? 64 : 32);
  for (int64_t m = m0; m < m1;) {
    const int mt = m1 - m >= 8 ? 8 : m1 - m >= 4 ? 4 : m1 - m >= 2 ? 2 : 1;
    const float* tab[8];
    for (int r = 0; r < mt; ++r) tab[r] = p.tab + (m + r) * tf;
    for (int64_t t = t0; t < t1; ++t) {
      __m256 out[8];
      const uint8_t* wt = p.w + t * tile_bytes;
      if (mt == 8) TileDot<8, kTernary>::run(tab, wt, Kb, out);
      else if (mt == 4) TileDot<4, kTernary>::run(tab, wt, Kb, out);
      else if (mt == 2) TileDot<2, kTernary>::run(tab, wt, Kb, out);
      else TileDot<1, kTernary>::run(tab, wt, Kb, out);
      const int64_t n0 = t * kBitsRows, nn = std::min(kBitsRows, p.N - n0);
      for (int r = 0; r < mt; ++r) {
        alignas(32) float o[8];
        _mm256_store_ps(o, out[r]);
        float* yr = p.y + (m + r) * p.N;
        for (int64_t i = 0; i < nn; ++i) yr[n0 + i] = epilogue_f32(o[i], p.alpha, p.bias, n0 + i);
      }
    }
    m += mt;
  }
}

void float_tiles_avx2(const FloatProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  if (p.ternary) float_tiles_impl<true>(p, m0, m1, t0, t1);
  else float_tiles_impl<false>(p, m0, m1, t0, t1);
}

// Per-byte popcounts of v.
inline __m256i popcnt_bytes(__m256i v) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                       2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low));
  __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
  return _mm256_add_epi8(lo, hi);
}

// Popcounts of (x_r ^ w) per row lane for MT activation rows over the Kb blocks of one tile.
template <int MT>
inline void xnor_rows(const uint32_t* const* xr, const uint8_t* wt, int64_t Kb,
                      __m256i last_mask, __m256i* out) {
  constexpr int kFlush = 31;  // byte counts grow by <= 8 per block
  const __m256i zero = _mm256_setzero_si256(), full = _mm256_set1_epi32(kBitsWordMask);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  __m256i cnt[MT], acc[MT];
  for (int r = 0; r < MT; ++r) cnt[r] = acc[r] = zero;
  auto step = [&](int64_t h, __m256i mask) {
    _mm_prefetch(reinterpret_cast<const char*>(wt + 32 * h + kPrefetch), _MM_HINT_T0);
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + 32 * h));
    for (int r = 0; r < MT; ++r) {
      const __m256i xv = _mm256_set1_epi32(static_cast<int>(xr[r][h]));
      const __m256i d = _mm256_and_si256(_mm256_xor_si256(xv, wv), mask);
      cnt[r] = _mm256_add_epi8(cnt[r], popcnt_bytes(d));
    }
  };
  auto flush = [&]() {
    for (int r = 0; r < MT; ++r) {
      const __m256i s16 = _mm256_maddubs_epi16(cnt[r], ones8);
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(s16, ones16));
      cnt[r] = zero;
    }
  };
  int pending = 0;
  for (int64_t h = 0; h + 1 < Kb; ++h) {
    step(h, full);
    if (++pending == kFlush) {
      flush();
      pending = 0;
    }
  }
  step(Kb - 1, last_mask);
  flush();
  for (int r = 0; r < MT; ++r) out[r] = acc[r];
}

void xnor_tiles_avx2(const XnorProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  const int64_t Kb = bits_blocks(p.K);
  const __m256i last_mask = _mm256_set1_epi32(static_cast<int>(block_mask(Kb - 1, p.K)));
  xnor_tiles_loop(p, m0, m1, t0, t1,
                  [&](int mt, const uint32_t* const* xr, const uint8_t* wt, __m256i* pop) {
                    if (mt == 4) xnor_rows<4>(xr, wt, Kb, last_mask, pop);
                    else if (mt == 2) xnor_rows<2>(xr, wt, Kb, last_mask, pop);
                    else xnor_rows<1>(xr, wt, Kb, last_mask, pop);
                  });
}

const Kernels kAvx2Kernels = {tables_avx2, float_tiles_avx2, xnor_tiles_avx2, nullptr};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace bits
}  // namespace qk
