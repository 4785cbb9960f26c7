// The AVX2 DPCM: 8 channels per vector, time serial (each step depends on the last ones), the
// same float32 operations in the same order as dpcm_scalar (scalar.cpp), so the bits agree.
// The mu-law quantizer (log1p / expm1) and the channels that do not fill a vector run scalar.
#include <immintrin.h>

#include "cpu/signal/kernels.h"

namespace qk {
namespace signal {
namespace {

void dpcm_avx2(const DpcmJob& j, int64_t c0, int64_t c1) {
  const DpcmArgs& a = j.a;
  if (a.quantizer != kDpcmUniform) return dpcm_scalar(j, c0, c1);
  const int64_t C = a.c;
  const int half = 1 << (a.bits - 1);
  const __m256 lo = _mm256_set1_ps(-float(half)), hi = _mm256_set1_ps(float(half - 1));
  const __m256 zero = _mm256_setzero_ps();
  const __m256i off = _mm256_set1_epi32(half);
  int64_t ch = c0;
  for (; ch + 8 <= c1; ch += 8) {
    __m256 coef[4];
    for (int k = 0; k < a.order; ++k) coef[k] = _mm256_loadu_ps(a.coef + k * C + ch);
    const __m256 s = _mm256_loadu_ps(a.step + ch), ns = _mm256_sub_ps(zero, s);
    alignas(32) int32_t cb[8];
    for (int64_t t = 0; t < a.t; ++t) {
      __m256 pred = zero;
      for (int k = 1; k <= a.order && t - k >= 0; ++k)
        pred = _mm256_add_ps(pred, _mm256_mul_ps(coef[k - 1],
                                                 _mm256_loadu_ps(j.xh + (t - k) * C + ch)));
      __m256 v;
      if (j.x) {
        const __m256 r = _mm256_sub_ps(_mm256_loadu_ps(j.x + t * C + ch), pred);
        __m256i code;
        if (a.bits == 1) {
          const __m256 ge = _mm256_cmp_ps(r, zero, _CMP_GE_OQ);
          v = _mm256_blendv_ps(ns, s, ge);
          code = _mm256_srli_epi32(_mm256_castps_si256(ge), 31);
        } else {
          __m256 q = _mm256_round_ps(_mm256_div_ps(r, s),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
          v = _mm256_mul_ps(q, s);
          code = _mm256_add_epi32(_mm256_cvtps_epi32(q), off);
        }
        _mm256_store_si256(reinterpret_cast<__m256i*>(cb), code);
        for (int i = 0; i < 8; ++i) j.codes[t * C + ch + i] = static_cast<uint8_t>(cb[i]);
      } else {
        for (int i = 0; i < 8; ++i) cb[i] = j.codes[t * C + ch + i];
        const __m256i code = _mm256_load_si256(reinterpret_cast<const __m256i*>(cb));
        if (a.bits == 1) {
          const __m256 one = _mm256_castsi256_ps(_mm256_cmpgt_epi32(code, _mm256_setzero_si256()));
          v = _mm256_blendv_ps(ns, s, one);
        } else {
          v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(code, off)), s);
        }
      }
      _mm256_storeu_ps(j.xh + t * C + ch, _mm256_add_ps(pred, v));
    }
  }
  if (ch < c1) dpcm_scalar(j, ch, c1);
}

const Kernels kAvx2Kernels = {dpcm_avx2};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace signal
}  // namespace qk
