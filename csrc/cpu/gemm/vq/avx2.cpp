// AVX2 loops of gemm_vq: 8 rows per vector (two per block of 16); tables of <= 8 entries by
// vpermps, larger by vgatherdps. Same float operations as scalar.cpp (kernels.h).
#include <immintrin.h>

#include "cpu/gemm/vq/kernels.h"
#include "cpu/runtime/simd_f32.h"

namespace qk {
namespace vqmm {
namespace {

struct Avx2 : simd::F32x8 {
  using I = __m256i;
  static constexpr int64_t kPerm = 8;
  static I keep(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(n < 8 ? n : 8)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static T load_n(const float* p, int64_t n) {
    return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, keep(n));
  }
  static void store_n(float* p, T v, int64_t n) {
    if (n >= 8)
      _mm256_storeu_ps(p, v);
    else
      _mm256_maskstore_ps(p, keep(n), v);
  }
  static I codes(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static I codes(const uint16_t* p) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static I nibbles(const uint32_t* p, int s) {
    return _mm256_and_si256(
        _mm256_srl_epi32(_mm256_loadu_si256(reinterpret_cast<const I*>(p)), _mm_cvtsi32_si128(s)),
        _mm256_set1_epi32(15));
  }
  static I zeroi() { return _mm256_setzero_si256(); }
  static I set1i(int32_t v) { return _mm256_set1_epi32(v); }
  static I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static I addi(I a, I b) { return _mm256_add_epi32(a, b); }
  static I mulsmall(I a, int64_t k) {
    return _mm256_mullo_epi32(a, _mm256_set1_epi32(static_cast<int32_t>(k)));
  }
  static I umax(I a, I b) { return _mm256_max_epu32(a, b); }
  static I clamp(I a, I last) { return _mm256_min_epu32(a, last); }
  static uint32_t hmax(I a) {
    alignas(32) uint32_t v[8];
    _mm256_store_si256(reinterpret_cast<I*>(v), a);
    uint32_t m = v[0];
    for (int i = 1; i < 8; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }
  // row[ix] for kc <= 8 (vpermps reads the low 3 bits: never a read past the row).
  static T lookup(const float* row, int64_t kc, I ix) {
    return _mm256_permutevar8x32_ps(load_n(row, kc), ix);
  }
  // t[ix] for a table of <= 8 entries in a register
  static T permute(T t, I ix) { return _mm256_permutevar8x32_ps(t, ix); }
  static T gather(const float* base, I ix) { return _mm256_i32gather_ps(base, ix, 4); }
  static __m128 pair(const float* p) {  // 2 floats in the low half
    return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
  }
  // 8 weights: the entries of codes c[0], c[16], ... (8 / dim of them) in a row
  template <int dim, class Code>
  static T weights(const float* bk, const Code* c) {
    if constexpr (dim == 8) return _mm256_loadu_ps(bk + c[0] * int64_t{8});
    if constexpr (dim == 4)
      return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(bk + c[0] * int64_t{4})),
                                  _mm_loadu_ps(bk + c[16] * int64_t{4}), 1);
    const __m128 lo = _mm_movelh_ps(pair(bk + c[0] * int64_t{2}), pair(bk + c[16] * int64_t{2}));
    const __m128 hi = _mm_movelh_ps(pair(bk + c[32] * int64_t{2}), pair(bk + c[48] * int64_t{2}));
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
  }
  // the rows path's tree (kernels.h): lanes j + j+16, j + j+8, then quarters, pairs
  static float reduce32(const T (&a)[4]) {
    const __m256 h = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3]));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

const Kernels kAvx2Kernels = simd_kernels<Avx2>();

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace vqmm
}  // namespace qk
