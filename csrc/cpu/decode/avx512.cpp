// The AVX-512 decode-step kernels: kernels.h's loops over 16-float vectors.
// GCC 12 warns about the undefined passthrough operand inside its own AVX-512 headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "cpu/decode/kernels.h"
#include "cpu/runtime/simd_f32.h"

namespace qk {
namespace decode {
namespace {

struct Avx512 : simd::F32x16 {
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T div(T a, T b) { return _mm512_div_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T min(T a, T b) { return _mm512_min_ps(a, b); }
  static T round(T a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // 2^n for integer-valued n in [-126, 127]: n + 127 in the exponent bits
  static T pow2(T n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static float hsum(T v) { return sum(v); }
};

const Kernels kAvx512Kernels = {norm_row<Avx512>, silu_mul<Avx512>, rope<Avx512>,
                                attend<Avx512>};

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace decode
}  // namespace qk
