// The amx level of gemm_fp8: from 16 rows up, the tile unit's bfloat16 products at float32
// accuracy (gemm/tile/bf16x3.h): activations split into three bfloat16 pieces, and every FP8
// value (E4M3, E5M2, their subnormals, the raw op's Inf / NaN / 480 patterns) exact in bfloat16.
// Weight panels decode 16 rows of W x 32 k per tile (api.h's binary16 route, then bfloat16) and
// transpose them to the tile layout. Per group: c = hi + lo, y = fma(s, c, y). Groups that are
// not a multiple of 32 (16, 48, ...; the raw op takes them) and calls of fewer than 16 rows run
// the AVX-512 kernel, as do the rows split() flags (NaN, Inf, values outside [2^-64, 2^64]).
#include "cpu/gemm/fp8/kernels.h"

#if defined(QK_HAVE_AMX_BF16)
// GCC 12's unmasked AVX-512 intrinsics start from _mm512_undefined_*() and report it as
// maybe-uninitialized once inlined (a false positive: every lane is written).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "cpu/gemm/tile/bf16x3.h"

namespace qk {
namespace fp8 {
namespace {

using tile_bf16x3::kTile;

template <int F>
struct Fp8Format {
  const Fp8Args* a;
  int64_t n, k, group;

  // 32 codes of row `row` from k0 (zero past K) as bfloat16 values, in k order.
  __m512i row_values(int64_t row, int64_t k0) const {
    const int64_t left = k - k0;
    const __mmask32 keep = left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << left) - 1);
    const __m512i c = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(keep, a->w + row * k + k0));
    __m512i h;
    if (F == kFp8E5M2) {
      h = _mm512_slli_epi16(c, 8);
    } else {  // value * 2^-8 as binary16
      h = _mm512_or_si512(_mm512_slli_epi16(_mm512_and_si512(c, _mm512_set1_epi16(0x80)), 8),
                          _mm512_slli_epi16(_mm512_and_si512(c, _mm512_set1_epi16(0x7f)), 7));
    }
    __m512 f0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    __m512 f1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
    if (F == kFp8E4M3) {
      f0 = _mm512_mul_ps(f0, _mm512_set1_ps(256.0f));
      f1 = _mm512_mul_ps(f1, _mm512_set1_ps(256.0f));
    }
    return tile_bf16x3::to_bf16(f0, f1);
  }
  void decode(int64_t c0, int64_t s0, int64_t s1, uint16_t* w) const {
    for (int j = 0; j < 2; ++j)
      for (int64_t s = s0; s < s1; ++s) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t row = c0 + 16 * j + i;
          r[i] = row < n ? row_values(row, s * tile_bf16x3::kStep) : _mm512_setzero_si512();
        }
        tile_bf16x3::store_columns(r, w + ((s - s0) * 2 + j) * kTile);
      }
  }
  __m512 scale(int64_t c, int64_t g) const {
    const int64_t ng = k / group;
    const __mmask16 keep = tile_bf16x3::lanes(n - c);
    if (ng == 1) return _mm512_maskz_loadu_ps(keep, a->scales + c);
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                             11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(static_cast<int>(ng)));
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), keep, idx, a->scales + c * ng + g, 4);
  }
  void store(int64_t row, int64_t c, __m512 y, __mmask16 keep) const {
    if (a->bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(keep, a->bias + c));
    _mm512_mask_storeu_ps(a->y + row * n + c, keep, y);
  }
};

bool call_amx(const Fp8Args& a) {
  if (a.m < 16 || a.k <= 0 || (a.group != a.k && a.group % tile_bf16x3::kStep != 0) ||
      !cpu_has_amx_bf16())
    return false;
  auto rerun = [&](int64_t row) { avx512_kernels()->gemm(a, row, row + 1, 0, a.n); };
  if (a.fmt == kFp8E4M3)
    tile_bf16x3::run_call(Fp8Format<kFp8E4M3>{&a, a.n, a.k, a.group}, a.x, a.m, rerun);
  else
    tile_bf16x3::run_call(Fp8Format<kFp8E5M2>{&a, a.n, a.k, a.group}, a.x, a.m, rerun);
  return true;
}

}  // namespace
}  // namespace fp8
}  // namespace qk
#endif

// The per-task kernel stays the AVX-512 one (fewer rows, other groups, flagged rows).
const qk::fp8::Kernels* qk::fp8::amx_kernels() {
#if defined(QK_HAVE_AMX_BF16)
  static const Kernels k = {avx512_kernels()->gemm, call_amx};
#else
  static const Kernels k = {avx512_kernels()->gemm, nullptr};
#endif
  return &k;
}
