// The AVX2 decode-step kernels: kernels.h's loops over 8-float vectors.
#include <immintrin.h>

#include "cpu/decode/kernels.h"
#include "cpu/runtime/simd_f32.h"

namespace qk {
namespace decode {
namespace {

struct Avx2 : simd::F32x8 {
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T div(T a, T b) { return _mm256_div_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T min(T a, T b) { return _mm256_min_ps(a, b); }
  static T round(T a) {
    return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // 2^n for integer-valued n in [-126, 127]: n + 127 in the exponent bits
  static T pow2(T n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static float hsum(T v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

const Kernels kAvx2Kernels = {norm_row<Avx2>, silu_mul<Avx2>, rope<Avx2>, attend<Avx2>};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace decode
}  // namespace qk
