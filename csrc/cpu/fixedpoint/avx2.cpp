// The AVX2 requantization: 8 channels per step, the same integers as scalar.cpp.
//   SaturatingRoundingDoublingHighMul: the 64-bit products of the even and odd lanes
//   (_mm256_mul_epi32), + 2^30, bits 31..62 (gemmlowp's nudge and truncating division by 2^31
//   equal floor((a b + 2^30) / 2^31) for every sign of a b); INT32_MIN^2 saturates.
//   RoundingDivideByPOT and the saturating left shift: per-lane variable shifts.
#include <immintrin.h>

#include "cpu/fixedpoint/kernels.h"

namespace qk {
namespace fixedpoint {
namespace {

inline __m256i srdhm8(__m256i a, __m256i b) {
  const __m256i off = _mm256_set1_epi64x(int64_t{1} << 30);
  const __m256i even = _mm256_srli_epi64(_mm256_add_epi64(_mm256_mul_epi32(a, b), off), 31);
  const __m256i odd = _mm256_slli_epi64(
      _mm256_add_epi64(_mm256_mul_epi32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32)), off),
      1);
  const __m256i r = _mm256_blend_epi32(even, odd, 0xAA);
  const __m256i mn = _mm256_set1_epi32(kInt32Min);
  const __m256i ovf = _mm256_and_si256(_mm256_cmpeq_epi32(a, mn), _mm256_cmpeq_epi32(b, mn));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(kInt32Max), ovf);
}

inline __m256i rdbpot8(__m256i x, __m256i e) {
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i mask = _mm256_sub_epi32(_mm256_sllv_epi32(one, e), one);
  const __m256i rem = _mm256_and_si256(x, mask);
  const __m256i neg = _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), x), one);
  const __m256i thr = _mm256_add_epi32(_mm256_srai_epi32(mask, 1), neg);
  return _mm256_add_epi32(_mm256_srav_epi32(x, e),
                          _mm256_and_si256(_mm256_cmpgt_epi32(rem, thr), one));
}

inline __m256i sat_shl8(__m256i x, __m256i s) {
  const __m256i y = _mm256_sllv_epi32(x, s);
  const __m256i ovf = _mm256_xor_si256(_mm256_cmpeq_epi32(_mm256_srav_epi32(y, s), x),
                                       _mm256_set1_epi32(-1));
  const __m256i sat = _mm256_xor_si256(_mm256_srai_epi32(x, 31), _mm256_set1_epi32(kInt32Max));
  return _mm256_blendv_epi8(y, sat, ovf);
}

// clamp(MultiplyByQuantizedMultiplier(x, m0, shift), lo, hi) + zp for 8 lanes.
inline __m256i requant8(__m256i x, __m256i m0, __m256i shift, const Bounds& b) {
  const __m256i zero = _mm256_setzero_si256();
  const __m256i left = _mm256_max_epi32(shift, zero);
  const __m256i right = _mm256_max_epi32(_mm256_sub_epi32(zero, shift), zero);
  __m256i v = rdbpot8(srdhm8(sat_shl8(x, left), m0), right);
  v = _mm256_min_epi32(_mm256_max_epi32(v, _mm256_set1_epi32(b.lo)), _mm256_set1_epi32(b.hi));
  return _mm256_add_epi32(v, _mm256_set1_epi32(b.zp));
}

inline void store(int32_t* p, __m256i v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
}

inline void store(int8_t* p, __m256i v) {  // values already in [-128, 127]
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w, w));
}

template <class Out>
void rows_avx2(const int32_t* acc, int64_t rows, int64_t channels, int64_t c0, int64_t c1,
               const Requant& q, Out* out) {
  const Bounds b = bounds(q);
  const int64_t cv = c0 + (c1 - c0) / 8 * 8;
  const __m256i m_all = _mm256_set1_epi32(q.m0[0]), s_all = _mm256_set1_epi32(q.shift[0]);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* a = acc + r * channels;
    Out* o = out + r * channels;
    for (int64_t c = c0; c < cv; c += 8) {
      const __m256i m = q.per_channel
          ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.m0 + c)) : m_all;
      const __m256i s = q.per_channel
          ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.shift + c)) : s_all;
      store(o + c, requant8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + c)), m, s,
                            b));
    }
  }
  if (cv < c1) rows_scalar(acc, rows, channels, cv, c1, q, out);
}

const Kernels kAvx2Kernels = {rows_avx2<int8_t>, rows_avx2<int32_t>};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace fixedpoint
}  // namespace qk
