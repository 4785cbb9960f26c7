// The float32 vector basics the families' SIMD translation units share: a family's vector type
// derives from F32x8 (AVX2 files) or F32x16 (AVX-512 files) and adds its own operations.
// Include from the avx2.cpp / avx512.cpp files only (their -m flags enable the intrinsics).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace qk {
namespace simd {

#if defined(__AVX2__)
struct F32x8 {
  using T = __m256;
  static constexpr int64_t kW = 8;
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T set1(float v) { return _mm256_set1_ps(v); }
};
#endif

#if defined(__AVX512F__)
struct F32x16 {
  using T = __m512;
  static constexpr int64_t kW = 16;
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  // v's two 8-lane halves added (the masked extract: GCC 12 reports the unmasked one, which
  // starts from an undefined register, as maybe-uninitialized).
  static __m256 halves(T v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_maskz_extractf32x8_ps(0xFF, v, 1));
  }
  // The sum of the 16 lanes: halves, then 128-bit halves, then pairs.
  static float sum(T v) {
    const __m256 h = halves(v);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#endif

}  // namespace simd
}  // namespace qk
