// The amx level's W8A16 (float activations x int8 weights) from 16 rows up: the tile unit's
// bfloat16 products at float32 accuracy (gemm/tile/bf16x3.h: each activation split into three
// bfloat16 pieces, int8 codes exact in bfloat16; tile_bf16x3::run_call splits the rows and
// the tasks), the weight panels converting 32 columns x 256 k of codes at a time. Rows the split
// flags (NaN, Inf, or values outside [2^-64, 2^64]) are recomputed on the AVX-512 kernel.
// Each output is a float32 sum within (K + 3K/256 + 4) u of the exact one (docs/numerics.md).
#include "cpu/gemm/w8/kernels.h"

#ifdef QK_HAVE_AMX_BF16
// GCC 12's unmasked AVX-512 intrinsics start from _mm512_undefined_*() and report it as
// maybe-uninitialized once inlined (a false positive: every lane is written).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "cpu/gemm/tile/bf16x3.h"
#include "cpu/gemm/w8/epilogue_avx512.h"
#include "cpu/gemm/w8/kernels.h"
#include "cpu/runtime/isa.h"

namespace qk {
namespace w8 {
namespace {

using tile_bf16x3::kTile;

// The packed codes (api.h) as a bf16x3 format: one group (the per-column scale after the sum).
struct W8Format {
  const int8_t* packed;
  int64_t n, k, group, kp;
  const W8Out* out;

  // Step s of block b, tile rows 2q, 2q + 1 from the 4-k step 8s + q (16 columns x 4 codes):
  // the 64 codes as bfloat16 in order, then the even / odd dwords (k pairs 4q, 4q + 2).
  void decode(int64_t c0, int64_t s0, int64_t s1, uint16_t* w) const {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const int64_t nb = w8_padded_n(n) / kW8BlockN, quads = kp / 4;
    for (int j = 0; j < 2; ++j) {
      const int64_t b = c0 / kW8BlockN + j;
      const int8_t* blk = packed + b * kW8BlockN * kp;
      for (int64_t s = s0; s < s1; ++s) {
        uint16_t* dst = w + ((s - s0) * 2 + j) * kTile;
        for (int64_t q = 0; q < 8; ++q) {
          const int64_t qq = 8 * s + q;
          if (b >= nb || qq >= quads) {
            _mm512_storeu_si512(dst + 64 * q, _mm512_setzero_si512());
            _mm512_storeu_si512(dst + 64 * q + 32, _mm512_setzero_si512());
            continue;
          }
          __m512 f[4];
          for (int i = 0; i < 4; ++i)
            f[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 64 * qq + 16 * i))));
          const __m512i lo = tile_bf16x3::to_bf16(f[0], f[1]);
          const __m512i hi = tile_bf16x3::to_bf16(f[2], f[3]);
          _mm512_storeu_si512(dst + 64 * q, _mm512_permutex2var_epi32(lo, even, hi));
          _mm512_storeu_si512(dst + 64 * q + 32, _mm512_permutex2var_epi32(lo, odd, hi));
        }
      }
    }
  }
  // (A pair's second 16 columns can lie past the padded N: masked.)
  __m512 scale(int64_t c, int64_t) const {
    return _mm512_maskz_loadu_ps(tile_bf16x3::lanes(n - c), out->sw + c);
  }
  // y = fma(sw, c, 0) = c * sw (w8a16_value), then + bias.
  void store(int64_t row, int64_t c, __m512 y, __mmask16 keep) const {
    if (out->bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(keep, out->bias + c));
    _mm512_mask_storeu_ps(out->y + row * out->n + c, keep, y);
  }
};

}  // namespace

bool f32_call_amx(const float* x, int64_t m, const int8_t* packed, int64_t n, int64_t k,
                  const W8Out& out) {
  if (m < 16 || !cpu_has_amx_bf16()) return false;
  const int64_t nb = w8_padded_n(n) / kW8BlockN;
  tile_bf16x3::run_call(W8Format{packed, n, k, k, w8_padded_k(k), &out}, x, m, [&](int64_t row) {
    f32_avx512(x, row, row + 1, packed, k, 0, nb, out);
  });
  return true;
}

}  // namespace w8
}  // namespace qk

#else  // a compiler without the AMX-BF16 flags: the AVX-512 kernel runs every call

bool qk::w8::f32_call_amx(const float*, int64_t, const int8_t*, int64_t, int64_t,
                          const W8Out&) {
  return false;
}

#endif
