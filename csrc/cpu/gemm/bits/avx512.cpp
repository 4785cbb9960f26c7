// AVX-512 (F/BW/VL/DQ + VNNI) kernels of the binary / ternary matmuls (see api.h and avx2.cpp).
//
// Float activations: the AVX2 kernels (tables and lookups), so the bits are AVX2's. A zmm form
// of the lookup (two tiles per zmm, each group's 8-float table broadcast to both halves,
// vpermps zmm) measured slower on Zen 4, which splits zmm permutes into two 256-bit halves
// (1 thread, 4096 x 4096, M = 1 / 2 / 4: binary 0.98x / 0.96x / 0.93x, ternary 0.85x / 0.59x /
// 0.61x the AVX2 speed), so it is not kept.
// XNOR: two 8-row tiles per zmm (tile t in lanes 0-7, t + 1 in lanes 8-15: two 32-byte loads
// and an insert per block; a last odd tile runs alone, its upper half unused), per-lane
// popcounts of (xbits ^ wbits): the vpshufb nibble table, one vpdpbusd summing
// each lane's 4 byte counts into its int32 count; exact integers, identical to the scalar
// kernel. (VPOPCNTD would save 5 ops per row and block, but is not part of the avx512 level.)
#include <immintrin.h>

#include <algorithm>

#include "cpu/gemm/bits/kernels.h"

namespace qk {
namespace bits {
namespace {

constexpr int64_t kPrefetch = 8192;  // bytes ahead in each tile's packed stream (avx2.cpp)

// The zero-masking forms with every lane selected: GCC 12 builds the plain ones from
// _mm512_undefined_*() and reports it as (maybe-)uninitialized.
constexpr __mmask16 kAll = 0xFFFF;

inline __m512i lo8(const uint8_t* p) { return _mm512_maskz_loadu_epi32(0xFF, p); }

// 32 bytes of tile t (p) in the low half, of tile t + 1 (p + stride) in the high half.
template <bool kTwo>
inline __m512i load2(const uint8_t* p, int64_t stride) {
  if constexpr (kTwo)
    return _mm512_maskz_inserti64x4(
        0xFF, lo8(p), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + stride)), 1);
  else return lo8(p);
}

template <bool kTwo>
inline void prefetch2(const uint8_t* p, int64_t stride) {
  _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch), _MM_HINT_T0);
  if (kTwo) _mm_prefetch(reinterpret_cast<const char*>(p + stride + kPrefetch), _MM_HINT_T0);
}

void tables_avx512(const float* x, int64_t K, bool ternary, float* tab) {
  avx2_kernels()->tables(x, K, ternary, tab);  // the same tables (and bits) as AVX2
}

void float_tiles_avx512(const FloatProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  avx2_kernels()->float_tiles(p, m0, m1, t0, t1);  // see the header comment
}

// ---- XNOR --------------------------------------------------------------------------------

// Per-lane popcounts, vpshufb nibble table: byte counts summed per lane by one vpdpbusd.
struct PopShuf {
  static inline __m512i add(__m512i acc, __m512i v) {
    const __m512i lut = _mm512_maskz_broadcast_i32x4(
        kAll, _mm_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4));
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, low));
    const __m512i hi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    return _mm512_dpbusd_epi32(acc, _mm512_add_epi8(lo, hi), _mm512_set1_epi8(1));
  }
};

// Popcounts of (x_r ^ w) per row lane for MT activation rows over the Kb blocks of a tile pair
// (the weights masked to the valid bits once per block; x words are zero beyond them).
template <int MT, bool kTwo, typename Pop>
inline void xnor_rows(const uint32_t* const* xr, const uint8_t* wt, int64_t Kb, uint32_t last,
                      __m512i* out) {
  const int64_t stride = Kb * 32;
  const __m512i full = _mm512_set1_epi32(static_cast<int>(kBitsWordMask));
  __m512i acc[MT];
  for (int r = 0; r < MT; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t h = 0; h < Kb; ++h) {
    prefetch2<kTwo>(wt + 32 * h, stride);
    const __m512i mask = h + 1 < Kb ? full : _mm512_set1_epi32(static_cast<int>(last));
    const __m512i wv = _mm512_and_si512(load2<kTwo>(wt + 32 * h, stride), mask);
    for (int r = 0; r < MT; ++r)
      acc[r] = Pop::add(acc[r],
                        _mm512_xor_si512(_mm512_set1_epi32(static_cast<int>(xr[r][h])), wv));
  }
  for (int r = 0; r < MT; ++r) out[r] = acc[r];
}

template <bool kTwo, typename Pop>
inline void xnor_pair(const uint32_t* const* xr, const uint8_t* wt, int64_t Kb, uint32_t last,
                      int mt, __m512i* out) {
  if (mt == 4) xnor_rows<4, kTwo, Pop>(xr, wt, Kb, last, out);
  else if (mt == 2) xnor_rows<2, kTwo, Pop>(xr, wt, Kb, last, out);
  else xnor_rows<1, kTwo, Pop>(xr, wt, Kb, last, out);
}

template <typename Pop>
inline void xnor_tiles_impl(const XnorProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  const int64_t Kb = bits_blocks(p.K);
  const uint32_t last = block_mask(Kb - 1, p.K);
  for (int64_t m = m0; m < m1;) {
    const int mt = m1 - m >= 4 ? 4 : m1 - m >= 2 ? 2 : 1;
    const uint32_t* xr[4];
    for (int r = 0; r < mt; ++r) xr[r] = p.xw + (m + r) * Kb;
    for (int64_t t = t0; t < t1; t += 2) {
      const bool two = t + 1 < t1;
      __m512i pop[4];
      const uint8_t* wt = p.w + t * Kb * 32;
      if (two) xnor_pair<true, Pop>(xr, wt, Kb, last, mt, pop);
      else xnor_pair<false, Pop>(xr, wt, Kb, last, mt, pop);
      const int64_t n0 = t * kBitsRows, nn = std::min<int64_t>(two ? 16 : 8, p.N - n0);
      for (int r = 0; r < mt; ++r) {
        alignas(64) int32_t o[16];
        _mm512_store_si512(o, pop[r]);
        float* yr = p.y + (m + r) * p.N;
        for (int64_t i = 0; i < nn; ++i)
          yr[n0 + i] = epilogue_xnor(p.K, o[i], p.alpha[n0 + i], p.beta[m + r], p.bias, n0 + i);
      }
    }
    m += mt;
  }
}

void xnor_tiles_shuf(const XnorProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  xnor_tiles_impl<PopShuf>(p, m0, m1, t0, t1);
}

const Kernels kAvx512Kernels = {tables_avx512, float_tiles_avx512, xnor_tiles_shuf};

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace bits
}  // namespace qk
