// The AVX-512 VQ kernels: register-blocked assignment (12 rows x one 16-centroid panel), the
// ADC table 16 sub-centroids at a time, the ADC scan of tables of <= 16 entries by lane
// permutations, 16 codes at a time (larger ones: the scalar loop). Same float operations as
// scalar.cpp (kernels.h).
#include <immintrin.h>

#include "cpu/runtime/simd_f32.h"
#include "cpu/vq/kernels.h"

namespace qk {
namespace vq {
namespace {

struct Avx512 : simd::F32x16 {
  using I = __m512i;
  static constexpr int kRows = 12;  // 12 accumulators, 32 registers
  static I lanes() {
    return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  static I seq(int64_t base) {
    return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(base)), lanes());
  }
  static __mmask16 lt(T a, T b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static __mmask16 le(T a, T b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
  static uint32_t bits(__mmask16 m) { return static_cast<uint32_t>(m); }
  static T blend(__mmask16 m, T a, T b) { return _mm512_mask_blend_ps(m, a, b); }
  static I blendi(__mmask16 m, I a, I b) { return _mm512_mask_blend_epi32(m, a, b); }
  static void storei(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
  static I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  // row[ix] for ksub <= 16 entries (a masked load, the rest zero).
  static T lookup(const float* row, int64_t ksub, I ix) {
    const T r = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << ksub) - 1), row);
    return _mm512_mask_permutexvar_ps(r, 0xFFFF, ix, r);
  }
};

const Kernels kAvx512Kernels = simd_kernels<Avx512>();

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace vq
}  // namespace qk
