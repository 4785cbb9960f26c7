// The AVX2 fake quantization: core/fakequant.h on 8 floats (the same float operations in the
// same order as scalar.cpp: vminps / vmaxps pass a NaN t through as fq_clamp does, vroundps
// rounds half to even as nearbyintf), the sums in double (kernels.h).
#include <immintrin.h>

#include "cpu/fakequant/kernels.h"
#include "cpu/runtime/simd_f32.h"

namespace qk {
namespace fakequant {
namespace {

struct Avx2 : simd::F32x8 {
  // t > hi ? hi : t, then u < lo ? lo : u (min/max return their second operand on NaN)
  static T clamp(T t, T lo, T hi) { return _mm256_max_ps(lo, _mm256_min_ps(hi, t)); }
  static T rne(T v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

  static T fwd(T x, T s, T inv, T b, bool has_b, T lo, T hi) {
    const T y = _mm256_mul_ps(rne(clamp(_mm256_mul_ps(_mm256_sub_ps(x, b), inv), lo, hi)), s);
    return has_b ? _mm256_add_ps(y, b) : y;
  }
  static void bwd(T x, T gy, T inv, T b, T lo, T hi, T* gx, T* st, T* go) {
    const T t = _mm256_mul_ps(_mm256_sub_ps(x, b), inv);
    const T tc = clamp(t, lo, hi);
    const T out = _mm256_or_ps(_mm256_cmp_ps(t, lo, _CMP_LT_OQ), _mm256_cmp_ps(t, hi, _CMP_GT_OQ));
    const T in = _mm256_and_ps(_mm256_cmp_ps(t, lo, _CMP_GE_OQ), _mm256_cmp_ps(t, hi, _CMP_LE_OQ));
    *gx = _mm256_and_ps(in, gy);
    *st = _mm256_blendv_ps(_mm256_sub_ps(rne(tc), tc), tc, out);
    *go = _mm256_and_ps(out, gy);
  }

  static __m256d lo4(T v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
  static __m256d hi4(T v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
  static __m256d fma4(__m256d acc, __m256d a, __m256d b) {  // two roundings: no FMA
    return _mm256_add_pd(acc, _mm256_mul_pd(a, b));
  }
  struct Acc {
    __m256d lo, hi;  // lanes 0..3, 4..7
  };
  static Acc acc_load(const double* p) { return {_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4)}; }
  static void acc_store(const Acc& a, double* p) {
    _mm256_storeu_pd(p, a.lo);
    _mm256_storeu_pd(p + 4, a.hi);
  }
  static void acc_add(Acc& a, T u, T v) {
    a.lo = fma4(a.lo, lo4(u), lo4(v));
    a.hi = fma4(a.hi, hi4(u), hi4(v));
  }
  static void mem_add(double* p, T u, T v) {
    _mm256_storeu_pd(p, fma4(_mm256_loadu_pd(p), lo4(u), lo4(v)));
    _mm256_storeu_pd(p + 4, fma4(_mm256_loadu_pd(p + 4), hi4(u), hi4(v)));
  }
};

const Kernels kAvx2Kernels = simd_kernels<Avx2>();

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace fakequant
}  // namespace qk
