// The AVX2 FWHT: stages h = 1, 2, 4 inside one 8-float register (a lane permutation, then the
// sums in the low lanes of each pair of groups and the differences in the high ones), the
// stages h >= 8 as whole-register butterflies (kernels.h). Same float operations as scalar.cpp.
#include <immintrin.h>

#include "cpu/hadamard/kernels.h"
#include "cpu/runtime/simd_f32.h"

namespace qk {
namespace hadamard {
namespace {

struct Avx2 : simd::F32x8 {
  // lane j + h (the high member of a pair) gets t - v = x[j] - x[j + h]; lane j gets v + t.
  template <int kMask>
  static T stage(T v, T t) {
    return _mm256_blend_ps(_mm256_add_ps(v, t), _mm256_sub_ps(t, v), kMask);
  }
  static void small(float* p, const T* s) {
    T v = _mm256_loadu_ps(p);
    v = stage<0xAA>(v, _mm256_permute_ps(v, 0xB1));           // h = 1: swap neighbours
    v = stage<0xCC>(v, _mm256_permute_ps(v, 0x4E));           // h = 2: swap pairs
    v = stage<0xF0>(v, _mm256_permute2f128_ps(v, v, 0x01));   // h = 4: swap halves
    if (s) v = _mm256_mul_ps(v, *s);
    _mm256_storeu_ps(p, v);
  }
};

void rows_avx2(float* x, int64_t rows, int64_t n, float scale) {
  for (int64_t r = 0; r < rows; ++r) row_simd<Avx2>(x + r * n, n, scale);
}

const Kernels kAvx2Kernels = {rows_avx2};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace hadamard
}  // namespace qk
