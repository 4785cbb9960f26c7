// The AVX-512 FWHT: stages h = 1, 2, 4, 8 inside one 16-float register, the stages h >= 16 as
// whole-register butterflies (kernels.h). Same float operations as scalar.cpp.
#include <immintrin.h>

#include "cpu/hadamard/kernels.h"
#include "cpu/runtime/simd_f32.h"

namespace qk {
namespace hadamard {
namespace {

struct Avx512 : simd::F32x16 {
  // lane j + h (the high member of a pair) gets t - v = x[j] - x[j + h]; lane j gets v + t.
  static T stage(T v, T t, __mmask16 high) {
    return _mm512_mask_blend_ps(high, _mm512_add_ps(v, t), _mm512_sub_ps(t, v));
  }
  // The masked forms with every lane selected: the unmasked ones start from
  // _mm512_undefined_ps(), which GCC 12 reports as maybe-uninitialized.
  template <int kImm>
  static T permute(T v) { return _mm512_mask_permute_ps(v, 0xFFFF, v, kImm); }
  template <int kImm>
  static T lanes(T v) { return _mm512_mask_shuffle_f32x4(v, 0xFFFF, v, v, kImm); }

  static void small(float* p, const T* s) {
    T v = _mm512_loadu_ps(p);
    v = stage(v, permute<0xB1>(v), 0xAAAA);  // h = 1: swap neighbours
    v = stage(v, permute<0x4E>(v), 0xCCCC);  // h = 2: swap pairs
    v = stage(v, lanes<0xB1>(v), 0xF0F0);    // h = 4: swap 128-bit lanes
    v = stage(v, lanes<0x4E>(v), 0xFF00);    // h = 8: swap 256-bit halves
    if (s) v = _mm512_mul_ps(v, *s);
    _mm512_storeu_ps(p, v);
  }
};

void rows_avx512(float* x, int64_t rows, int64_t n, float scale) {
  for (int64_t r = 0; r < rows; ++r) row_simd<Avx512>(x + r * n, n, scale);
}

const Kernels kAvx512Kernels = {rows_avx512};

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace hadamard
}  // namespace qk
