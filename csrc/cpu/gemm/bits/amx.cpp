// The amx level of the binary / ternary matmuls with float activations: from 16 rows up, the
// tile unit's bfloat16 products at float32 accuracy (gemm/tile/bf16x3.h; the weights +-1 and 0
// are exact in bfloat16). Weight panels come straight from the bit planes, 16 rows at a time
// (two 8-row tiles, one 32-bit lane per row): each lane's 32 weights of a 32-k step are cut
// from two consecutive 30-bit words with lane-uniform shifts, then tile row q (k pair q) is
// built from bits 2q and 2q + 1 of every lane: no transpose. y = acc * alpha (+ bias) as
// epilogue_f32. Rows of x that split() flags (NaN, Inf, values outside [2^-64, 2^64]) and calls
// of fewer than 16 rows run the lower level's kernel (tables + AVX2 tiles); XNOR is unchanged.
#include "cpu/gemm/bits/kernels.h"

#if defined(QK_HAVE_AMX_BF16)
// GCC 12's unmasked AVX-512 intrinsics start from _mm512_undefined_*() and report it as
// maybe-uninitialized once inlined (a false positive: every lane is written).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "cpu/gemm/tile/bf16x3.h"
#include "cpu/runtime/aligned.h"

namespace qk {
namespace bits {
namespace {

using tile_bf16x3::kTile;

struct BitsFormat {
  const FloatProblem* p;
  int64_t n, k, group;
  int64_t kb, tiles;  // blocks per row, 8-row tiles

  // The 30-bit words of block h, plane `plane`, for rows c .. c + 15 (zero past the tiles and
  // past K's blocks).
  __m512i words(int64_t c, int64_t h, int plane) const {
    const int64_t t = c / kBitsRows;
    if (h >= kb || t >= tiles) return _mm512_setzero_si512();
    const int64_t planes = bits_planes(p->ternary);
    const uint8_t* a = p->w + ((t * kb + h) * planes + plane) * 32;
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
    __m512i v = _mm512_zextsi256_si512(lo);
    if (t + 1 < tiles)
      v = _mm512_inserti64x4(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                    a + kb * planes * 32)), 1);
    return _mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(kBitsWordMask)));
  }
  // Bit i of lane r: the weight bit of row c + r at k = 32 s + i, plane `plane`. 32 s mod 30
  // is even, so at most 28: words h and h + 1 always hold all 32.
  __m512i lane_bits(int64_t c, int64_t s, int plane) const {
    const int64_t k0 = 32 * s, h = k0 / kBitsBlock;
    const int off = static_cast<int>(k0 % kBitsBlock);
    const __m512i m = _mm512_srl_epi32(words(c, h, plane), _mm_cvtsi32_si128(off));
    return _mm512_or_si512(
        m, _mm512_sll_epi32(words(c, h + 1, plane), _mm_cvtsi32_si128(kBitsBlock - off)));
  }
  void decode(int64_t c0, int64_t s0, int64_t s1, uint16_t* w) const {
    const __m512i one = _mm512_set1_epi32(1), mag_lo = _mm512_set1_epi32(0x3F80),
                  mag_hi = _mm512_set1_epi32(0x3F800000), sign_lo = _mm512_set1_epi32(0x8000),
                  sign_hi = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    for (int j = 0; j < 2; ++j)
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t c = c0 + 16 * j, left = k - 32 * s;
        const __m512i valid = _mm512_set1_epi32(
            left >= 32 ? -1 : static_cast<int>((uint32_t{1} << left) - 1));
        __m512i nz, neg;  // weight nonzero, weight -1
        if (p->ternary) {
          const __m512i pp = lane_bits(c, s, 0), qq = lane_bits(c, s, 1);
          nz = _mm512_and_si512(_mm512_xor_si512(pp, qq), valid);  // P - Q: both set is 0
          neg = _mm512_andnot_si512(pp, _mm512_and_si512(qq, valid));
        } else {
          nz = valid;
          neg = _mm512_and_si512(lane_bits(c, s, 0), valid);
        }
        uint16_t* dst = w + ((s - s0) * 2 + j) * kTile;
        for (int q = 0; q < 16; ++q) {  // k pair q: bits 2q (low bfloat16), 2q + 1 (high)
          const __m128i sh = _mm_cvtsi32_si128(2 * q);
          const __m512i a = _mm512_srl_epi32(nz, sh), b = _mm512_srl_epi32(neg, sh);
          const __m512i lo = _mm512_or_si512(
              _mm512_and_si512(_mm512_sub_epi32(_mm512_setzero_si512(), _mm512_and_si512(a, one)),
                               mag_lo),
              _mm512_and_si512(_mm512_slli_epi32(b, 15), sign_lo));
          const __m512i hi = _mm512_or_si512(
              _mm512_and_si512(_mm512_sub_epi32(_mm512_setzero_si512(),
                                                _mm512_and_si512(_mm512_srli_epi32(a, 1), one)),
                               mag_hi),
              _mm512_and_si512(_mm512_slli_epi32(b, 30), sign_hi));
          _mm512_storeu_si512(dst + 32 * q, _mm512_or_si512(lo, hi));
        }
      }
  }
  __m512 scale(int64_t c, int64_t) const {
    return _mm512_maskz_loadu_ps(tile_bf16x3::lanes(n - c), p->alpha + c);
  }
  void store(int64_t row, int64_t c, __m512 y, __mmask16 m) const {  // y = acc * alpha
    if (p->bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, p->bias + c));
    _mm512_mask_storeu_ps(p->y + row * n + c, m, y);
  }
};

bool float_call_amx(const FloatProblem& p) {
  if (p.M < 16 || p.K == 0 || !cpu_has_amx_bf16()) return false;
  const Kernels* lower = avx512_kernels();
  const int64_t tiles = bits_padded_rows(p.N) / kBitsRows;
  const BitsFormat fmt{&p, p.N, p.K, p.K, bits_blocks(p.K), tiles};
  AlignedVector<float> tab(static_cast<size_t>(lower->tables ? table_floats(p.K) : 0));
  tile_bf16x3::run_call(fmt, p.x, p.M, [&](int64_t row) {
    FloatProblem one = p;  // the row alone, on the lower level's kernel
    one.x = p.x + row * p.K;
    one.y = p.y + row * p.N;
    one.M = 1;
    if (lower->tables) {  // (AlignedVector: the 32-byte alignment the tables need)
      lower->tables(one.x, p.K, p.ternary, tab.data());
      one.tab = tab.data();
    }
    lower->float_tiles(one, 0, 1, 0, tiles);
  });
  return true;
}

}  // namespace
}  // namespace bits
}  // namespace qk
#endif

// The per-task kernels stay the AVX-512 level's (fewer rows, flagged rows, XNOR).
const qk::bits::Kernels* qk::bits::amx_kernels() {
  const Kernels* lower = avx512_kernels();
#if defined(QK_HAVE_AMX_BF16)
  static const Kernels k = {lower->tables, lower->float_tiles, lower->xnor_tiles, float_call_amx};
#else
  static const Kernels k = {lower->tables, lower->float_tiles, lower->xnor_tiles, nullptr};
#endif
  return &k;
}
