// The int4 kernels' per-group code offsets on a tile pair (AVX-512), shared by the avx512 and
// amx translation units of gemm_w4 (include only from those).
#pragma once
#include <immintrin.h>

#include "cpu/gemm/tile/avx512.h"
#include "cpu/gemm/w4/kernels.h"

namespace qk {
namespace w4 {

// (8 + z) of the pair's rows for group g, as float (the float zero points themselves if given).
inline __m512 code_offsets(const Problem& p, int64_t t, int nt, int64_t g) {
  const int64_t ng = p.k / p.group;
  if (p.zeros_f) return tile_avx512::params_pair(p.zeros_f, ng, t, nt, g);
  const __m512 eight = _mm512_set1_ps(8.0f);
  if (!p.zeros) return eight;
  const __m256i za =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.zeros + (t * ng + g) * kW4Rows));
  const __m256i zb = _mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(p.zeros + ((t + nt - 1) * ng + g) * kW4Rows));
  const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(za), zb, 1);
  return _mm512_add_ps(eight, _mm512_cvtepi32_ps(z));
}

}  // namespace w4
}  // namespace qk
