// The 2-bit / 3-bit blocks of a tile pair as 4-code groups (AVX-512), shared by the avx512 and
// amx translation units of gemm_w23 (include only from those).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm/w23/geo.h"

namespace qk {
namespace w23 {

// The zero-masking forms with every lane selected: GCC 12 builds the plain ones from
// _mm512_undefined_*() and reports it as maybe-uninitialized.
constexpr __mmask16 kAll = 0xFFFF;
template <int N>
inline __m512i srli32(__m512i v) { return _mm512_maskz_srli_epi32(kAll, v, N); }
inline __m512 cvt(__m512i v) { return _mm512_maskz_cvtepi32_ps(kAll, v); }

inline __m256i load8(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// 32 bytes at p in the low half, the high half zero.
inline __m512i lo8(const uint8_t* p) { return _mm512_maskz_loadu_epi32(0xFF, p); }

// 32 bytes of tile t (p0) in the low half, of tile t + 1 (p1) in the high half (zero if !kTwo).
template <bool kTwo>
inline __m512i load2(const uint8_t* p0, const uint8_t* p1) {
  if constexpr (kTwo) return _mm512_maskz_inserti64x4(0xFF, lo8(p0), load8(p1), 1);
  else return lo8(p0);
}

// Step S's word of the pair's 16 rows (geo.h); steps 3, 4 of B = 3 assembled in place.
template <int BITS, int S, bool kTwo>
inline __m512i word(const uint8_t* b0, const uint8_t* b1) {
  if constexpr (BITS == 2 || S < 3) {
    return load2<kTwo>(b0 + 32 * S, b1 + 32 * S);
  } else {
    constexpr int i = S - 3;
    const __m512i lo = _mm512_and_si512(srli32<6>(load2<kTwo>(b0 + 32 * i, b1 + 32 * i)),
                                        _mm512_set1_epi32(0x03030303));
    const __m512i hi = _mm512_and_si512(srli32<4 + i>(load2<kTwo>(b0 + 64, b1 + 64)),
                                        _mm512_set1_epi32(0x04040404));
    return _mm512_or_si512(lo, hi);
  }
}

// The block's codes of the pair's 16 rows: u[c] lane r bytes = codes 4c .. 4c+3 of row r.
template <int BITS, bool kTwo>
inline void decode_u8(const uint8_t* b0, const uint8_t* b1, __m512i (&u)[8]) {
  const __m512i mask = _mm512_set1_epi8(BITS == 2 ? 0x03 : 0x07);
  if constexpr (BITS == 2) {
    for (int i = 0; i < 2; ++i) {
      const __m512i v = word<2, 0, kTwo>(b0 + 32 * i, b1 + 32 * i);
      u[4 * i] = _mm512_and_si512(v, mask);
      for (int q = 1; q < 4; ++q)
        u[4 * i + q] = _mm512_and_si512(_mm512_srli_epi16(v, 2 * q), mask);
    }
  } else {
    for (int i = 0; i < 3; ++i) {
      const __m512i v = word<3, 0, kTwo>(b0 + 32 * i, b1 + 32 * i);
      u[2 * i] = _mm512_and_si512(v, mask);
      u[2 * i + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 3), mask);
    }
    u[6] = word<3, 3, kTwo>(b0, b1);
    u[7] = word<3, 4, kTwo>(b0, b1);
  }
}

}  // namespace w23
}  // namespace qk
