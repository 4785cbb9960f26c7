// The AVX-512 log-domain matmul: 16 outputs of a row at once (w transposed, N padded to 16),
// the exponent sums as int32 lanes, 2^(integer part) built in the float exponent field, the
// dropped products (integer part below -126) zeroed by a mask. The fraction table is held in
// registers and looked up by vpermps (f <= 4: 16 entries), vpermt2ps (f = 5: 32 entries) or two
// vpermt2ps and a blend on bit 5 of the index (f = 6: 64 entries). The same float operations per output as scalar.cpp (one multiply, a
// sign flip, one add per product in k order; then * xs[m], * ws[n]).
// GCC 12 warns about the undefined passthrough operand inside its own AVX-512 headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "cpu/logmm/kernels.h"

namespace qk {
namespace logmm {
namespace {

// The table lookups by f: kind 0 one register (f <= 4), 1 two (f = 5), 2 four (f = 6).
template <int kKind>
inline __m512 lookup(__m512i fr, const __m512 (&t)[4]) {
  if constexpr (kKind == 0) return _mm512_permutexvar_ps(fr, t[0]);
  const __m512 lo = _mm512_permutex2var_ps(t[0], fr, t[1]);
  if constexpr (kKind == 1) return lo;
  const __mmask16 upper = _mm512_test_epi32_mask(fr, _mm512_set1_epi32(32));
  return _mm512_mask_blend_ps(upper, lo, _mm512_permutex2var_ps(t[2], fr, t[3]));
}

template <int kKind>
void rows_kind(const Args& a, int64_t m0, int64_t m1) {
  const int f = a.frac_bits;
  const __m512i fmask = _mm512_set1_epi32((1 << f) - 1);
  const __m512i lim = _mm512_set1_epi32(-127), bias = _mm512_set1_epi32(127);
  const __m128i fcount = _mm_cvtsi32_si128(f);
  // The table padded to the registers' 64 entries (indices never exceed 2^f - 1).
  alignas(64) float tab[64] = {};
  for (int j = 0; j < (1 << f); ++j) tab[j] = a.table[j];
  const __m512 tb[4] = {_mm512_load_ps(tab), _mm512_load_ps(tab + 16), _mm512_load_ps(tab + 32),
                       _mm512_load_ps(tab + 48)};
  for (int64_t m = m0; m < m1; ++m) {
    const int32_t* xe = a.xe + m * a.K;
    const uint32_t* xs = a.xs + m * a.K;
    for (int64_t n0 = 0; n0 < a.N; n0 += 16) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < a.K; ++k) {
        if (xe[k] == kZeroExp) continue;
        const __m512i s = _mm512_add_epi32(_mm512_set1_epi32(xe[k]),
                                           _mm512_loadu_si512(a.we + k * a.Np + n0));
        const __m512i si = _mm512_sra_epi32(s, fcount);
        const __m512 t = lookup<kKind>(_mm512_and_si512(s, fmask), tb);
        const __m512 p2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(si, bias), 23));
        const __mmask16 keep = _mm512_cmpgt_epi32_mask(si, lim);
        const __m512 p = _mm512_maskz_mul_ps(keep, t, p2);
        const __m512i sg = _mm512_xor_si512(_mm512_set1_epi32(static_cast<int32_t>(xs[k])),
                                            _mm512_loadu_si512(a.ws + k * a.Np + n0));
        acc = _mm512_add_ps(acc, _mm512_castsi512_ps(
                                     _mm512_xor_si512(_mm512_castps_si512(p), sg)));
      }
      const int64_t nn = a.N - n0 < 16 ? a.N - n0 : 16;
      const __mmask16 mask = static_cast<__mmask16>((1u << nn) - 1);
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(acc, _mm512_set1_ps(a.xscale[m])),
                                     _mm512_maskz_loadu_ps(mask, a.wscale + n0));
      _mm512_mask_storeu_ps(a.out + m * a.N + n0, mask, v);
    }
  }
}

void rows_avx512(const Args& a, int64_t m0, int64_t m1) {
  if (a.frac_bits <= 4) rows_kind<0>(a, m0, m1);
  else if (a.frac_bits == 5) rows_kind<1>(a, m0, m1);
  else rows_kind<2>(a, m0, m1);
}

const Kernels kAvx512Kernels = {rows_avx512};

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace logmm
}  // namespace qk
