// AVX-512 loops of gemm_vq: 16 rows per vector; tables of <= 16 entries by vpermps, <= 32 by
// vpermt2ps, larger by vgatherdps. Same float operations as scalar.cpp (kernels.h).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <type_traits>

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
  static I lanes() {
    return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  static I nibbles(const uint32_t* p, int s) {
    return _mm512_and_si512(_mm512_srl_epi32(_mm512_loadu_si512(p), _mm_cvtsi32_si128(s)),
                            _mm512_set1_epi32(15));
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

// The lanes path for small codebooks (kc <= 8, dim * kc <= 16 after rounding kc up to a power
// of two KC): the block's 16 rows' entries in registers, entry l * KC + c of coordinate d's
// table = row l's entry c (zero past kc), looked up by vpermt2ps and a blend tree on the index
// bits 5.. instead of a gather per coordinate. The same products and sums as lane_simd.
template <int KC>
__m512 pick(const __m512 (&t)[KC], __m512i idx) {
  if constexpr (KC == 1) {
    return _mm512_permutexvar_ps(idx, t[0]);
  } else {
    __m512 r[KC / 2];
    for (int j = 0; j < KC / 2; ++j) r[j] = _mm512_permutex2var_ps(t[2 * j], idx, t[2 * j + 1]);
    for (int bit = 5, step = 1; step < KC / 2; ++bit, step *= 2) {
      const __mmask16 hi = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(1 << bit));
      for (int j = 0; j + step < KC / 2; j += 2 * step)
        r[j] = _mm512_mask_blend_ps(hi, r[j], r[j + step]);
    }
    return r[0];
  }
}

template <int KC, int DIM, class Code>
uint32_t lane_regs(const float* x, int64_t nvt, const Code* codes, int64_t kc,
                   const float* books, const int32_t* base, int64_t v0, float* chains) {
  alignas(64) float tb[DIM][16 * KC];
  for (int d = 0; d < DIM; ++d)
    for (int l = 0; l < 16; ++l)
      for (int c = 0; c < KC; ++c) tb[d][l * KC + c] = c < kc ? books[base[l] + c * DIM + d] : 0;
  __m512 t[DIM][KC];
  for (int d = 0; d < DIM; ++d)
    for (int j = 0; j < KC; ++j) t[d][j] = _mm512_load_ps(tb[d] + 16 * j);
  const __m512i off = _mm512_mullo_epi32(Avx512::lanes(), _mm512_set1_epi32(KC));
  const __m512i last = _mm512_set1_epi32(static_cast<int32_t>(kc - 1));
  __m512i top = _mm512_setzero_si512();
  chain_loop<Avx512>(nvt, v0, chains, [&](int64_t v, __m512* out) {
    const __m512i ix = codes_at<Avx512>(codes, v, 0);
    top = _mm512_max_epu32(top, ix);
    const __m512i idx = _mm512_add_epi32(_mm512_min_epu32(ix, last), off);
    const float* xv = x + v * DIM;
    __m512 s = _mm512_mul_ps(pick<KC>(t[0], idx), _mm512_set1_ps(xv[0]));
    for (int d = 1; d < DIM; ++d)
      s = _mm512_add_ps(s, _mm512_mul_ps(pick<KC>(t[d], idx), _mm512_set1_ps(xv[d])));
    out[0] = s;
  });
  return _mm512_reduce_max_epu32(top);
}

template <class Code>
uint32_t lane_avx512(const float* x, int64_t nvt, int64_t dim, const Code* codes, int64_t kc,
                     const float* books, const int32_t* base, int64_t v0, float* chains) {
  const int64_t kp = kc <= 1 ? 1 : kc <= 2 ? 2 : kc <= 4 ? 4 : kc <= 8 ? 8 : 16;
  const auto run = [&](auto kcp, auto dp) {
    return lane_regs<decltype(kcp)::value, decltype(dp)::value>(x, nvt, codes, kc, books, base,
                                                                v0, chains);
  };
  using std::integral_constant;
  // (16 entries per row would take 16 table registers: slower than gathers, measured)
  if (kc <= 8 && kp * dim <= 16) {
    const integral_constant<int, 1> d1;
    const integral_constant<int, 2> d2;
    const integral_constant<int, 4> d4;
    const integral_constant<int, 8> d8;
    if (kp == 1 && dim == 1) return run(d1, d1);
    if (kp == 1 && dim == 2) return run(d1, d2);
    if (kp == 1 && dim == 4) return run(d1, d4);
    if (kp == 1 && dim == 8) return run(d1, d8);
    if (kp == 2 && dim == 1) return run(d2, d1);
    if (kp == 2 && dim == 2) return run(d2, d2);
    if (kp == 2 && dim == 4) return run(d2, d4);
    if (kp == 2 && dim == 8) return run(d2, d8);
    if (kp == 4 && dim == 1) return run(d4, d1);
    if (kp == 4 && dim == 2) return run(d4, d2);
    if (kp == 4 && dim == 4) return run(d4, d4);
    if (kp == 8 && dim == 1) return run(d8, d1);
    if (kp == 8 && dim == 2) return run(d8, d2);
  }
  return lane_simd<Avx512, Code>(x, nvt, dim, codes, kc, books, base, v0, chains);
}

// constexpr: a table built at load time would run this file's AVX-512 code on every CPU
constexpr Kernels avx512_table() {
  Kernels k = simd_kernels<Avx512>();
  k.u8.lane = lane_avx512<uint8_t>;
  k.u16.lane = lane_avx512<uint16_t>;
  return k;
}

constexpr Kernels kAvx512Kernels = avx512_table();

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace vqmm
}  // namespace qk
