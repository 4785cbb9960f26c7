// gemm_vq8's codebook look-up in registers (avx512.cpp, amx.cpp): a plane of up to 256 bytes
// held in NT = 1, 2 or 4 registers, indexed by the 64 code bytes of c (VBMI byte permutes;
// with 4 registers, `hi` = the codes' top bits picks the upper 128 bytes). Codes past the
// plane's registers wrap (vq8_tables holds 0 past kc; the callers check the largest code).
// Include only from translation units compiled for the avx512 set.
#pragma once
#include <immintrin.h>

#include "cpu/gemm/vq8/kernels.h"

#define QK_VBMI __attribute__((target("avx512vbmi")))

namespace qk {
namespace vq8 {

template <int NT>
QK_VBMI inline __m512i lookup(const __m512i* t, __m512i c, __mmask64 hi) {
  if constexpr (NT == 1) {
    return _mm512_permutexvar_epi8(c, t[0]);
  } else if constexpr (NT == 2) {
    return _mm512_permutex2var_epi8(t[0], c, t[1]);
  } else {
    const __m512i lo = _mm512_permutex2var_epi8(t[0], c, t[1]);
    return _mm512_mask_blend_epi8(hi, lo, _mm512_permutex2var_epi8(t[2], c, t[3]));
  }
}

// The DIM planes of a block's tables (kernels.h block_tables) in NT registers each, as
// unsigned bytes w + 128 (vpdpbusd's operand).
template <int DIM, int NT>
inline void load_planes(const int8_t* tab, __m512i (&t)[DIM][NT]) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int d = 0; d < DIM; ++d)
    for (int j = 0; j < NT; ++j)
      t[d][j] = _mm512_xor_si512(_mm512_loadu_si512(tab + d * 256 + 64 * j), flip);
}

// Block b's weights as the look-ups give them (t: load_planes): panel[(q dim + d) 64 ..] =
// plane d of code group q, 16 rows x 4 vectors (64-byte aligned). Returns the largest code.
template <int DIM, int NT, bool NIB>
QK_VBMI inline uint32_t decode_panel(const Problem& p, int64_t b, const __m512i (&t)[DIM][NT],
                                     uint8_t* panel) {
  const uint8_t* codes = p.packed4 + b * block_bytes(p);
  const __m512i low4 = _mm512_set1_epi8(15);
  __m512i top = _mm512_setzero_si512();
  for (int64_t q = 0; q < p.nv / kVq8Group; ++q) {
    __m512i c;
    if constexpr (NIB) {  // group q: the low (q even) or high nibbles of byte group q / 2
      c = _mm512_loadu_si512(codes + q / 2 * 64);
      c = _mm512_and_si512(q % 2 ? _mm512_srli_epi16(c, 4) : c, low4);
    } else {
      c = _mm512_loadu_si512(codes + q * 64);
    }
    top = _mm512_max_epu8(top, c);
    const __mmask64 hi = NT == 4 ? _mm512_movepi8_mask(c) : 0;
    for (int d = 0; d < DIM; ++d)
      _mm512_store_si512(panel + (q * DIM + d) * 64, lookup<NT>(t[d], c, hi));
  }
  alignas(64) uint8_t tb[64];
  _mm512_store_si512(tb, top);
  uint32_t mx = 0;
  for (uint8_t v : tb) mx = v > mx ? v : mx;
  return mx;
}

// decode_panel for any shape gemm_vq8 takes (its own tables, the layout of p).
template <int DIM, int NT>
QK_VBMI inline uint32_t decode_block_nt(const Problem& p, int64_t b, uint8_t* panel) {
  __m512i t[DIM][NT];
  load_planes(block_tables(p, b), t);
  return p.nib ? decode_panel<DIM, NT, true>(p, b, t, panel)
               : decode_panel<DIM, NT, false>(p, b, t, panel);
}

template <int DIM>
QK_VBMI inline uint32_t decode_block_dim(const Problem& p, int64_t b, uint8_t* panel) {
  if (p.kc <= 64) return decode_block_nt<DIM, 1>(p, b, panel);
  if (p.kc <= 128) return decode_block_nt<DIM, 2>(p, b, panel);
  if constexpr (DIM < 8) return decode_block_nt<DIM, 4>(p, b, panel);
  return 0;  // unreachable: vq8_supported caps kc at 128 for dim 8
}

QK_VBMI inline uint32_t decode_block(const Problem& p, int64_t b, uint8_t* panel) {
  if (p.dim == 2) return decode_block_dim<2>(p, b, panel);
  if (p.dim == 4) return decode_block_dim<4>(p, b, panel);
  return decode_block_dim<8>(p, b, panel);
}

}  // namespace vq8
}  // namespace qk
