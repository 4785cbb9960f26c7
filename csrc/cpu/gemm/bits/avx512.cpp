// AVX-512 (F/BW/VL/DQ + VNNI) kernels of the binary / ternary matmuls (see api.h and avx2.cpp).
//
// The AVX2 kernels' algorithm on two 8-row tiles per zmm (tile t in lanes 0-7, t + 1 in lanes
// 8-15: two 32-byte loads and an insert per block and plane; a last odd tile runs alone, its
// upper half masked off at the store). Float activations: the same per-call tables (built by
// the AVX2 code), each group's 8-float table broadcast to both halves (vbroadcastf32x8), so
// `word >> 3j` indexes it through vpermps in each half (bit 3 of an index, the next group's
// first bit, only selects the half: both hold the same table); per 16 rows x 3 weights a shift,
// a broadcast load, a permute and an FMA by 1.0 (ternary: two). The chains per row, their
// assignment to groups and the final pairwise sum are the AVX2 kernel's, so every output has
// the AVX2 path's bits (within the documented bound of the scalar order, api.h).
// XNOR: per-lane popcounts of (xbits ^ wbits): the vpshufb nibble table, one vpdpbusd summing
// each lane's 4 byte counts into its int32 count; exact integers, identical to the scalar
// kernel. (VPOPCNTD would save 5 ops per row and block, but is not part of the avx512 level.)
#include <immintrin.h>

#include <algorithm>

#include "cpu/gemm/bits/kernels.h"
#include "cpu/gemm/bits/lut_dot.h"

namespace qk {
namespace bits {
namespace {

constexpr int64_t kPrefetch = 8192;  // bytes ahead in each tile's packed stream (avx2.cpp)

// The zero-masking forms with every lane selected: GCC 12 builds the plain ones from
// _mm512_undefined_*() and reports it as (maybe-)uninitialized.
constexpr __mmask16 kAll = 0xFFFF;

// The 8 floats at p (32-byte aligned) in both halves; table lookup by the low 3 bits of idx.
inline __m512 bcast8(const float* p) {
  return _mm512_maskz_broadcast_f32x8(kAll, _mm256_load_ps(p));
}
inline __m512 perm(__m512i idx, __m512 t) { return _mm512_maskz_permutexvar_ps(kAll, idx, t); }

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

// Rows 8t .. 8t + 15 (8t .. 8t + 7 when !two) of one activation row's y from 16 lane values.
inline __mmask16 pair_mask(int64_t n0, bool two, int64_t N) {
  const int64_t cnt = std::min<int64_t>(two ? 16 : 8, N - n0);
  return static_cast<__mmask16>((1u << cnt) - 1);
}

void tables_avx512(const float* x, int64_t K, bool ternary, float* tab) {
  avx2_kernels()->tables(x, K, ternary, tab);  // the same tables (and bits) as AVX2
}

// Tiles t, t + 1 (lanes 0-7, 8-15; t alone when !kTwo) for LutDot (lut_dot.h): each group's
// table in both halves, so the low 3 bits of an index pick the entry in either half.
template <bool kTwo>
struct Avx512Pair {
  using F = __m512;
  using I = __m512i;
  int64_t stride;  // bytes from tile t's block to tile t + 1's
  static F zero() { return _mm512_setzero_ps(); }
  static F one() { return _mm512_set1_ps(1.0f); }
  static F lookup(const float* t, I idx) { return perm(idx, bcast8(t)); }
  template <int N>
  static I srli(I v) { return _mm512_maskz_srli_epi32(kAll, v, N); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  I load(const uint8_t* p) const { return load2<kTwo>(p, stride); }
  void prefetch(const uint8_t* p) const { prefetch2<kTwo>(p, stride); }
};

// Each batch of rows (lut_dot.h) over the tile pairs.
template <bool kTernary>
void float_tiles_impl(const FloatProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  const int64_t Kb = bits_blocks(p.K), tile_bytes = Kb * (kTernary ? 64 : 32);
  for_row_batches(p, m0, m1, [&](int64_t m, int mt, const float* const* tab) {
    for (int64_t t = t0; t < t1; t += 2) {
      const bool two = t + 1 < t1;
      __m512 out[8];
      const uint8_t* wt = p.w + t * tile_bytes;
      if (two) lut_rows<Avx512Pair<true>, kTernary>({tile_bytes}, tab, wt, Kb, mt, out);
      else lut_rows<Avx512Pair<false>, kTernary>({tile_bytes}, tab, wt, Kb, mt, out);
      const int64_t n0 = t * kBitsRows;
      const __mmask16 mask = pair_mask(n0, two, p.N);
      const __m512 alpha = _mm512_maskz_loadu_ps(mask, p.alpha + n0);
      const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(mask, p.bias + n0) : _mm512_setzero_ps();
      for (int r = 0; r < mt; ++r) {  // epilogue_f32: acc * alpha (+ bias)
        __m512 v = _mm512_mul_ps(out[r], alpha);
        if (p.bias) v = _mm512_add_ps(v, bias);
        _mm512_mask_storeu_ps(p.y + (m + r) * p.N + n0, mask, v);
      }
    }
  });
}

void float_tiles_avx512(const FloatProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  if (p.ternary) float_tiles_impl<true>(p, m0, m1, t0, t1);
  else float_tiles_impl<false>(p, m0, m1, t0, t1);
}

// ---- XNOR --------------------------------------------------------------------------------

// Per-lane popcounts, vpshufb nibble table: byte counts summed per lane by one vpdpbusd.
struct PopShuf {
  static inline __m512i add(__m512i acc, __m512i v) {
    const __m512i lut = _mm512_maskz_broadcast_i32x4(kAll, 
        _mm_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4));
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
