// The AVX-512 requantization: 16 channels per step, the same integers as scalar.cpp (the
// operations of avx2.cpp on 16 lanes, with mask registers for the comparisons and
// _mm512_cvtepi32_epi8 for the int8 store).
// GCC 12 warns about the undefined passthrough operand inside its own AVX-512 headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include "cpu/fixedpoint/kernels.h"

namespace qk {
namespace fixedpoint {
namespace {

inline __m512i srdhm16(__m512i a, __m512i b) {
  const __m512i off = _mm512_set1_epi64(int64_t{1} << 30);
  const __m512i even = _mm512_srli_epi64(_mm512_add_epi64(_mm512_mul_epi32(a, b), off), 31);
  const __m512i odd = _mm512_slli_epi64(
      _mm512_add_epi64(_mm512_mul_epi32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32)), off),
      1);
  const __m512i r = _mm512_mask_blend_epi32(0xAAAA, even, odd);
  const __m512i mn = _mm512_set1_epi32(kInt32Min);
  const __mmask16 ovf = _mm512_cmpeq_epi32_mask(a, mn) & _mm512_cmpeq_epi32_mask(b, mn);
  return _mm512_mask_blend_epi32(ovf, r, _mm512_set1_epi32(kInt32Max));
}

inline __m512i rdbpot16(__m512i x, __m512i e) {
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i mask = _mm512_sub_epi32(_mm512_sllv_epi32(one, e), one);
  const __m512i rem = _mm512_and_si512(x, mask);
  const __mmask16 neg = _mm512_cmplt_epi32_mask(x, _mm512_setzero_si512());
  const __m512i thr = _mm512_mask_add_epi32(_mm512_srai_epi32(mask, 1), neg,
                                            _mm512_srai_epi32(mask, 1), one);
  const __mmask16 up = _mm512_cmpgt_epi32_mask(rem, thr);
  const __m512i q = _mm512_srav_epi32(x, e);
  return _mm512_mask_add_epi32(q, up, q, one);
}

inline __m512i sat_shl16(__m512i x, __m512i s) {
  const __m512i y = _mm512_sllv_epi32(x, s);
  const __mmask16 ovf = _mm512_cmpneq_epi32_mask(_mm512_srav_epi32(y, s), x);
  const __m512i sat = _mm512_xor_si512(_mm512_srai_epi32(x, 31), _mm512_set1_epi32(kInt32Max));
  return _mm512_mask_blend_epi32(ovf, y, sat);
}

inline __m512i requant16(__m512i x, __m512i m0, __m512i shift, const Bounds& b) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i left = _mm512_max_epi32(shift, zero);
  const __m512i right = _mm512_max_epi32(_mm512_sub_epi32(zero, shift), zero);
  __m512i v = rdbpot16(srdhm16(sat_shl16(x, left), m0), right);
  v = _mm512_min_epi32(_mm512_max_epi32(v, _mm512_set1_epi32(b.lo)), _mm512_set1_epi32(b.hi));
  return _mm512_add_epi32(v, _mm512_set1_epi32(b.zp));
}

inline void store(int32_t* p, __m512i v) { _mm512_storeu_si512(p, v); }

inline void store(int8_t* p, __m512i v) {  // values already in [-128, 127]
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(v));
}

template <class Out>
void rows_avx512(const int32_t* acc, int64_t rows, int64_t channels, int64_t c0, int64_t c1,
                 const Requant& q, Out* out) {
  const Bounds b = bounds(q);
  const int64_t cv = c0 + (c1 - c0) / 16 * 16;
  const __m512i m_all = _mm512_set1_epi32(q.m0[0]), s_all = _mm512_set1_epi32(q.shift[0]);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* a = acc + r * channels;
    Out* o = out + r * channels;
    for (int64_t c = c0; c < cv; c += 16) {
      const __m512i m = q.per_channel ? _mm512_loadu_si512(q.m0 + c) : m_all;
      const __m512i s = q.per_channel ? _mm512_loadu_si512(q.shift + c) : s_all;
      store(o + c, requant16(_mm512_loadu_si512(a + c), m, s, b));
    }
  }
  if (cv < c1) rows_scalar(acc, rows, channels, cv, c1, q, out);
}

const Kernels kAvx512Kernels = {rows_avx512<int8_t>, rows_avx512<int32_t>};

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace fixedpoint
}  // namespace qk
