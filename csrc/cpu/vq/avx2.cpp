// The AVX2 VQ kernels: register-blocked assignment (6 rows x one 16-centroid panel, two
// 8-float vectors), the ADC table 8 sub-centroids at a time, the ADC scan by gathers. Same
// float operations as scalar.cpp (kernels.h).
#include <immintrin.h>

#include "cpu/runtime/simd_f32.h"
#include "cpu/vq/kernels.h"

namespace qk {
namespace vq {
namespace {

struct Avx2 : simd::F32x8 {
  using I = __m256i;
  static I seq(int64_t base) {
    return _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(base)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static I seqmul(int32_t s) {
    return _mm256_mullo_epi32(_mm256_set1_epi32(s), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static T lt(T a, T b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static T blend(T m, T a, T b) { return _mm256_blendv_ps(a, b, m); }
  static I blendi(T m, I a, I b) {
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), m));
  }
  static void storei(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<I*>(p), v); }
  static I set1i(int32_t v) { return _mm256_set1_epi32(v); }
  static I andi(I a, I b) { return _mm256_and_si256(a, b); }
  static I addi(I a, I b) { return _mm256_add_epi32(a, b); }
  static I gather_words(const char* base, I off) {
    return _mm256_i32gather_epi32(reinterpret_cast<const int*>(base), off, 1);
  }
  static T gather(const float* t, I ix) { return _mm256_i32gather_ps(t, ix, 4); }
};

void assign_avx2(const float* x, int64_t n, const Packed& c, int64_t* idx, float* v) {
  assign_simd<Avx2>(x, n, c, idx, v);
}

void table_avx2(const float* q, int64_t m, int64_t ksub, int64_t dsub, const float* cb,
                const float* cbt, float* table) {
  table_simd<Avx2>(q, m, ksub, dsub, cb, cbt, table);
}

void scan_u8_avx2(const float* table, int64_t ksub, const uint8_t* codes, int64_t n, int64_t m,
                  float* dist) {
  scan_simd<Avx2>(table, ksub, codes, n, m, dist);
}

void scan_u16_avx2(const float* table, int64_t ksub, const uint16_t* codes, int64_t n,
                   int64_t m, float* dist) {
  scan_simd<Avx2>(table, ksub, codes, n, m, dist);
}

const Kernels kAvx2Kernels = {assign_avx2, table_avx2, scan_u8_avx2, scan_u16_avx2};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace vq
}  // namespace qk
