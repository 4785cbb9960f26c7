// The float-activation table-lookup dot of the binary / ternary matmuls (avx2.cpp explains the
// method), written once for any vector width: V supplies the vector types and operations (an
// AVX2 one for 8-row tiles, an AVX-512 one for pairs of tiles), so both ISAs run the same float
// operations in the same order. Include only from the SIMD translation units.
//
// The partial sums are accumulated with FMA by 1.0: fma(p, 1, acc) = acc + p exactly (p * 1
// is exact, one rounding), but it issues on the FMA pipes, while on Zen 5 FP adds share two
// pipes with the vector shifts (measured: 7.7 instead of 11.7 cycles per block for one row).
// C chains per row hide the FMA latency.
#pragma once
#include <cstdint>
#include <utility>

#include "cpu/gemm/bits/kernels.h"

namespace qk {
namespace bits {

// V: F, I (float / int vectors); F zero(), one(); F lookup(const float* table8, I idx) (entry
// idx & 7 of the group's 8-float table in every lane); I srli<N>(I); F fmadd(a, b, c),
// fnmadd(a, b, c), add(a, b); and, as members, I load(const uint8_t*) (the block's plane
// vector) and prefetch(const uint8_t*).
// MT activation rows times V's rows: out[r] lane i = sum over k of weight row i.
template <class V, int MT, bool kTernary>
struct LutDot {
  using F = typename V::F;
  using I = typename V::I;
  static constexpr int C = MT == 1 ? kBitsGroups : MT == 2 ? 5 : MT == 4 ? 2 : 1;
  static constexpr int64_t kVec = kTernary ? 64 : 32;  // bytes per block and tile

  template <int J>
  static inline void group(const I wp, const I wq, const float* const* tb, F one,
                           F (&acc)[MT][C]) {
    const I ip = J == 0 ? wp : V::template srli<3 * J>(wp);
    for (int r = 0; r < MT; ++r)
      acc[r][J % C] = V::fmadd(V::lookup(tb[r] + 8 * J, ip), one, acc[r][J % C]);
    if (kTernary) {  // acc - q: the Q plane's subset sums
      const I iq = J == 0 ? wq : V::template srli<3 * J>(wq);
      for (int r = 0; r < MT; ++r)
        acc[r][J % C] = V::fnmadd(V::lookup(tb[r] + 8 * J, iq), one, acc[r][J % C]);
    }
  }

  template <int... J>
  static inline void block(const I wp, const I wq, const float* const* tb, F one,
                           F (&acc)[MT][C], std::integer_sequence<int, J...>) {
    (group<J>(wp, wq, tb, one, acc), ...);
  }

  static inline void run(const V& v, const float* const* tab, const uint8_t* wt, int64_t Kb,
                         F* out) {
    const F one = V::one();
    F acc[MT][C];
    for (int r = 0; r < MT; ++r)
      for (int k = 0; k < C; ++k) acc[r][k] = V::zero();
    for (int64_t h = 0; h < Kb; ++h) {
      const uint8_t* w = wt + kVec * h;
      v.prefetch(w);
      if (kTernary) v.prefetch(w + 32);
      const I wp = v.load(w);
      const I wq = kTernary ? v.load(w + 32) : wp;
      const float* tb[MT];
      for (int r = 0; r < MT; ++r) tb[r] = tab[r] + kBitsGroups * 8 * h;
      block(wp, wq, tb, one, acc, std::make_integer_sequence<int, kBitsGroups>{});
    }
    for (int r = 0; r < MT; ++r) {  // pairwise
      F s[C];
      for (int k = 0; k < C; ++k) s[k] = acc[r][k];
      for (int w = 1; w < C; w *= 2)
        for (int k = 0; k + w < C; k += 2 * w) s[k] = V::add(s[k], s[k + w]);
      out[r] = s[0];
    }
  }
};

// Rows of one tile (or pair) in the batch of mt = 8, 4, 2 or 1 rows.
template <class V, bool kTernary>
inline void lut_rows(const V& v, const float* const* tab, const uint8_t* wt, int64_t Kb, int mt,
                     typename V::F* out) {
  if (mt == 8) LutDot<V, 8, kTernary>::run(v, tab, wt, Kb, out);
  else if (mt == 4) LutDot<V, 4, kTernary>::run(v, tab, wt, Kb, out);
  else if (mt == 2) LutDot<V, 2, kTernary>::run(v, tab, wt, Kb, out);
  else LutDot<V, 1, kTernary>::run(v, tab, wt, Kb, out);
}

// Rows [m0, m1) in batches of 8, then 4, 2, 1: fixed by M alone (the splits over threads cut
// at multiples of 8), so results do not depend on the thread count. f(m, mt, tab) runs a batch,
// tab[r] the tables of row m + r.
template <typename Fn>
inline void for_row_batches(const FloatProblem& p, int64_t m0, int64_t m1, Fn f) {
  const int64_t tf = table_floats(p.K);
  for (int64_t m = m0; m < m1;) {
    const int mt = m1 - m >= 8 ? 8 : m1 - m >= 4 ? 4 : m1 - m >= 2 ? 2 : 1;
    const float* tab[8];
    for (int r = 0; r < mt; ++r) tab[r] = p.tab + (m + r) * tf;
    f(m, mt, tab);
    m += mt;
  }
}

}  // namespace bits
}  // namespace qk
