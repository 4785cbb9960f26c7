// AVX-512 loops of gemm_vq: 16 rows per vector; tables of <= 16 entries by vpermps, <= 32 by
// vpermt2ps, larger by vgatherdps. Same float operations as scalar.cpp (kernels.h).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "cpu/gemm/vq/kernels.h"
#include "cpu/runtime/simd_f32.h"

namespace qk {
namespace vqmm {
namespace {

struct Avx512 : simd::F32x16 {
  using I = __m512i;
  static constexpr int64_t kPerm = 32;
  static __mmask16 first(int64_t n) {
    return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                   : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1);
  }
  static T load_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static void store_n(float* p, T v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
  static I codes(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static I codes(const uint16_t* p) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static I zeroi() { return _mm512_setzero_si512(); }
  static I set1i(int32_t v) { return _mm512_set1_epi32(v); }
  static I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  static I addi(I a, I b) { return _mm512_add_epi32(a, b); }
  static I mulsmall(I a, int64_t k) {
    return _mm512_mullo_epi32(a, _mm512_set1_epi32(static_cast<int32_t>(k)));
  }
  static I umax(I a, I b) { return _mm512_max_epu32(a, b); }
  static I clamp(I a, I last) { return _mm512_min_epu32(a, last); }
  static uint32_t hmax(I a) { return _mm512_reduce_max_epu32(a); }
  // row[ix] for kc <= 32 (indices use their low 4 / 5 bits: never a read past the row).
  static T lookup(const float* row, int64_t kc, I ix) {
    if (kc <= 16) return _mm512_permutexvar_ps(ix, load_n(row, kc));
    return _mm512_permutex2var_ps(_mm512_loadu_ps(row), ix, load_n(row + 16, kc - 16));
  }
  // t[ix] for a table of <= 16 entries in a register
  static T permute(T t, I ix) { return _mm512_permutexvar_ps(ix, t); }
  static T gather(const float* base, I ix) { return _mm512_i32gather_ps(ix, base, 4); }
  static __m128 pair(const float* p) {  // 2 floats in the low half
    return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
  }
  // 16 weights: the entries of codes c[0], c[16], ... (16 / dim of them) in a row
  template <int dim, class Code>
  static T weights(const float* bk, const Code* c) {
    if constexpr (dim == 8)
      return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(bk + c[0] * int64_t{8})),
                                _mm256_loadu_ps(bk + c[16] * int64_t{8}), 1);
    __m128 q[4];
    if constexpr (dim == 4) {
      for (int i = 0; i < 4; ++i) q[i] = _mm_loadu_ps(bk + c[16 * i] * int64_t{4});
    } else {  // dim 2
      for (int i = 0; i < 4; ++i)
        q[i] = _mm_movelh_ps(pair(bk + c[32 * i] * int64_t{2}),
                             pair(bk + c[32 * i + 16] * int64_t{2}));
    }
    const __m512 lo = _mm512_insertf32x4(_mm512_castps128_ps512(q[0]), q[1], 1);
    return _mm512_insertf32x4(_mm512_insertf32x4(lo, q[2], 2), q[3], 3);
  }
  // the rows path's tree: lanes j + j+16, then halves, quarters, pairs (F32x16::sum)
  static float reduce32(const T (&a)[2]) { return sum(_mm512_add_ps(a[0], a[1])); }
};

const Kernels kAvx512Kernels = simd_kernels<Avx512>();

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace vqmm
}  // namespace qk
