// The AVX-512 epilogue pieces of the int8-weight matmuls, shared by the translation units
// compiled for the avx512 level or above (avx512.cpp, f32_avx512.cpp, amx.cpp): one block's 16
// columns of a row, masked to the valid columns, through w8a8_value / the int32 output.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm/w8/kernels.h"

namespace qk {
namespace w8 {
namespace {

// int32 -> float (the masked form: the plain one starts from _mm512_undefined_ps(), which
// GCC 12 reports as maybe-uninitialized; an all-ones mask compiles to the same vcvtdq2ps).
inline __m512 to_ps(__m512i v) { return _mm512_mask_cvtepi32_ps(_mm512_setzero_ps(), 0xFFFF, v); }

inline __mmask16 col_mask(int64_t col, int64_t n) {
  const int64_t left = n - col;
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (left > 0 ? left : 0)) - 1);
}

// Block columns [col, col + 16) of row `row` from the sums d less comp: the int32 sums, or
// (float(acc) * sx) * sw (+ bias) as w8a8_value computes it.
inline void store_s8(__m512i d, int32_t comp, int64_t row, int64_t col, const W8Out& o) {
  const __m512i acc = _mm512_sub_epi32(d, _mm512_set1_epi32(comp));
  const __mmask16 m = col_mask(col, o.n);
  if (o.acc) {
    _mm512_mask_storeu_epi32(o.acc + row * o.n + col, m, acc);
    return;
  }
  __m512 v = _mm512_mul_ps(to_ps(acc), _mm512_set1_ps(o.sx[row]));
  v = _mm512_mul_ps(v, _mm512_loadu_ps(o.sw + col));
  if (o.bias) v = _mm512_add_ps(v, _mm512_loadu_ps(o.bias + col));
  _mm512_mask_storeu_ps(o.y + row * o.n + col, m, v);
}

}  // namespace
}  // namespace w8
}  // namespace qk
