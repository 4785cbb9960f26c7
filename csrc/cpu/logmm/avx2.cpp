// The AVX2 log-domain matmul: 8 outputs of a row at once (w transposed, N padded to 8), the
// exponent sums as int32 lanes, the fraction table by gather, 2^(integer part) built in the
// float exponent field. The same float operations per output as scalar.cpp.
#include <immintrin.h>

#include "cpu/logmm/kernels.h"

namespace qk {
namespace logmm {
namespace {

void rows_avx2(const Args& a, int64_t m0, int64_t m1) {
  const __m256i fmask = _mm256_set1_epi32((1 << a.frac_bits) - 1);
  const __m256i lim = _mm256_set1_epi32(-127), bias = _mm256_set1_epi32(127);
  const __m128i fcount = _mm_cvtsi32_si128(a.frac_bits);
  alignas(32) float tmp[8];
  for (int64_t m = m0; m < m1; ++m) {
    const int32_t* xe = a.xe + m * a.K;
    const uint32_t* xs = a.xs + m * a.K;
    for (int64_t n0 = 0; n0 < a.N; n0 += 8) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t k = 0; k < a.K; ++k) {
        if (xe[k] == kZeroExp) continue;
        const __m256i s = _mm256_add_epi32(
            _mm256_set1_epi32(xe[k]),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.we + k * a.Np + n0)));
        const __m256i si = _mm256_sra_epi32(s, fcount);
        const __m256i fr = _mm256_and_si256(s, fmask);
        const __m256 t = _mm256_i32gather_ps(a.table, fr, 4);
        const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(si, bias), 23));
        const __m256i keep = _mm256_cmpgt_epi32(si, lim);
        __m256 p = _mm256_and_ps(_mm256_mul_ps(t, p2), _mm256_castsi256_ps(keep));
        const __m256i sg = _mm256_xor_si256(
            _mm256_set1_epi32(static_cast<int32_t>(xs[k])),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.ws + k * a.Np + n0)));
        p = _mm256_xor_ps(p, _mm256_castsi256_ps(sg));
        acc = _mm256_add_ps(acc, p);
      }
      _mm256_store_ps(tmp, acc);
      const int64_t nn = a.N - n0 < 8 ? a.N - n0 : 8;
      for (int64_t j = 0; j < nn; ++j)
        a.out[m * a.N + n0 + j] = tmp[j] * a.xscale[m] * a.wscale[n0 + j];
    }
  }
}

const Kernels kAvx2Kernels = {rows_avx2};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace logmm
}  // namespace qk
