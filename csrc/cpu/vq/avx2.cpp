// The AVX2 VQ kernels: register-blocked assignment (6 rows x one 16-centroid panel, two
// 8-float vectors), the ADC table 8 sub-centroids at a time, the ADC scan of tables of <= 8
// entries by lane permutations (larger ones: the scalar loop). Same float operations as
// scalar.cpp (kernels.h).
#include <immintrin.h>

#include "cpu/runtime/simd_f32.h"
#include "cpu/vq/kernels.h"

namespace qk {
namespace vq {
namespace {

struct Avx2 : simd::F32x8 {
  using I = __m256i;
  static constexpr int kRows = 6;  // 12 accumulators + 2 panel vectors + 1 broadcast
  static I seq(int64_t base) {
    return _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(base)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static T lt(T a, T b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static T le(T a, T b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
  static uint32_t bits(T m) { return static_cast<uint32_t>(_mm256_movemask_ps(m)); }
  static T blend(T m, T a, T b) { return _mm256_blendv_ps(a, b, m); }
  static I blendi(T m, I a, I b) {
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), m));
  }
  static void storei(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<I*>(p), v); }
  static I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  // row[ix] for ksub <= 8 entries (a masked load: no read past row[ksub - 1]; the rest zero).
  static T lookup(const float* row, int64_t ksub, I ix) {
    const I lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const I keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(ksub)), lanes);
    return _mm256_permutevar8x32_ps(_mm256_maskload_ps(row, keep), ix);
  }
  // (a, b) = the lexicographic minimum of (a, b) and (c, d), lane by lane.
  static void pick(T& a, I& b, T c, I d) {
    const T eq = _mm256_cmp_ps(c, a, _CMP_EQ_OQ);
    const T ilt = _mm256_castsi256_ps(_mm256_cmpgt_epi32(b, d));
    const T take = _mm256_or_ps(_mm256_cmp_ps(c, a, _CMP_LT_OQ), _mm256_and_ps(eq, ilt));
    a = _mm256_blendv_ps(a, c, take);
    b = blendi(take, b, d);
  }
  // Every lane of (a, b) the minimum over all lanes: pick across 4, 2, 1 lanes.
  static void butterfly(T& a, I& b) {
    pick(a, b, _mm256_permute2f128_ps(a, a, 1), _mm256_permute2x128_si256(b, b, 1));
    pick(a, b, _mm256_permute_ps(a, 0x4E), _mm256_shuffle_epi32(b, 0x4E));
    pick(a, b, _mm256_permute_ps(a, 0xB1), _mm256_shuffle_epi32(b, 0xB1));
  }
};

const Kernels kAvx2Kernels = simd_kernels<Avx2>();

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace vq
}  // namespace qk
