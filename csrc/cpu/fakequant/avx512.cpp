// The AVX-512 fake quantization: core/fakequant.h on 16 floats (the same float operations in
// the same order as scalar.cpp; vrndscaleps rounds half to even as nearbyintf), the sums in
// double: elements 0..7 then 8..15 of each vector into the 8 lanes (kernels.h).
#include <immintrin.h>

#include "cpu/fakequant/kernels.h"
#include "cpu/runtime/simd_f32.h"

namespace qk {
namespace fakequant {
namespace {

struct Avx512 : simd::F32x16 {
  // The masked forms with every lane selected (as hadamard/avx512.cpp): the unmasked ones start
  // from _mm512_undefined_*(), which GCC 12 reports as maybe-uninitialized.
  static T clamp(T t, T lo, T hi) {
    return _mm512_mask_max_ps(lo, 0xFFFF, lo, _mm512_mask_min_ps(hi, 0xFFFF, hi, t));
  }
  static T rne(T v) {
    return _mm512_mask_roundscale_ps(v, 0xFFFF, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }

  static T fwd(T x, T s, T inv, T b, bool has_b, T lo, T hi) {
    const T y = _mm512_mul_ps(rne(clamp(_mm512_mul_ps(_mm512_sub_ps(x, b), inv), lo, hi)), s);
    return has_b ? _mm512_add_ps(y, b) : y;
  }
  static void bwd(T x, T gy, T inv, T b, T lo, T hi, T* gx, T* st, T* go) {
    const T t = _mm512_mul_ps(_mm512_sub_ps(x, b), inv);
    const T tc = clamp(t, lo, hi);
    const __mmask16 out =
        _mm512_cmp_ps_mask(t, lo, _CMP_LT_OQ) | _mm512_cmp_ps_mask(t, hi, _CMP_GT_OQ);
    const __mmask16 in =
        _mm512_cmp_ps_mask(t, lo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(t, hi, _CMP_LE_OQ);
    *gx = _mm512_maskz_mov_ps(in, gy);
    *st = _mm512_mask_blend_ps(out, _mm512_sub_ps(rne(tc), tc), tc);
    *go = _mm512_maskz_mov_ps(out, gy);
  }

  static __m512d widen(__m256 v) { return _mm512_mask_cvtps_pd(_mm512_setzero_pd(), 0xFF, v); }
  template <int kHalf>  // floats 0..7 or 8..15 (GCC's cast to 256 bits is an unmasked extract)
  static __m256 half(T v) {
    const __m512d d = _mm512_castps_pd(v);
    return _mm256_castpd_ps(_mm512_mask_extractf64x4_pd(_mm256_setzero_pd(), 0xF, d, kHalf));
  }
  static __m512d lo8(T v) { return widen(half<0>(v)); }
  static __m512d hi8(T v) { return widen(half<1>(v)); }
  static __m512d fma8(__m512d acc, __m512d a, __m512d b) {  // two roundings: no FMA
    return _mm512_add_pd(acc, _mm512_mul_pd(a, b));
  }
  using Acc = __m512d;  // lanes 0..7
  static Acc acc_load(const double* p) { return _mm512_loadu_pd(p); }
  static void acc_store(const Acc& a, double* p) { _mm512_storeu_pd(p, a); }
  static void acc_add(Acc& a, T u, T v) {
    a = fma8(a, lo8(u), lo8(v));
    a = fma8(a, hi8(u), hi8(v));
  }
  static void mem_add(double* p, T u, T v) {
    _mm512_storeu_pd(p, fma8(_mm512_loadu_pd(p), lo8(u), lo8(v)));
    _mm512_storeu_pd(p + 8, fma8(_mm512_loadu_pd(p + 8), hi8(u), hi8(v)));
  }
};

const Kernels kAvx512Kernels = simd_kernels<Avx512>();

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace fakequant
}  // namespace qk
