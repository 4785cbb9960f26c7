// AVX2 kernels of the binary / ternary matmuls (see gemm_bits.h).
//
// Float activations: each 32-bit half of a weight word is broadcast; lane i of sub-vector j
// shifts its bit 8j+i to bit 31 (vpsllvd), which is then XORed into x's sign: sums of +-x with
// no multiplies (ternary also ANDs with its nonzero mask). Up to 4 activation rows share each
// decoded mask. (vblendvps instead of AND + XOR measured slower.)
// XNOR: popcount of (xbits ^ wbits) 256 bits at a time with the pshufb nibble table (AVX2 has
// no vector popcount), summed with vpsadbw; the tail words are masked exactly as the scalar
// kernel masks them, so the integer results are identical.
#include <immintrin.h>

#include "cpu/gemm_bits.h"

namespace qk {
namespace bits {
namespace {

struct Consts {
  __m256i sh[4];  // sh[j] lane i: 31 - (8j + i)
  Consts() {
    for (int j = 0; j < 4; ++j)
      sh[j] = _mm256_setr_epi32(31 - 8 * j, 30 - 8 * j, 29 - 8 * j, 28 - 8 * j, 27 - 8 * j,
                                26 - 8 * j, 25 - 8 * j, 24 - 8 * j);
  }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// MT activation rows (MT in 1, 2, 4) times one weight row. C independent chains per row.
// Ternary: nonzero and negative words interleaved (see gemm_bits.h).
template <int MT, bool kTernary>
inline void dot_rows(const float* const* xr, int64_t KW, const uint8_t* wr, const Consts& c,
                     float* out) {
  constexpr int C = MT == 1 ? 4 : 2;
  __m256 acc[MT][C];
  for (int r = 0; r < MT; ++r)
    for (int k = 0; k < C; ++k) acc[r][k] = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t h = 0; h < 2 * KW; ++h) {  // 32 weights per step
    const int64_t off = 32 * h;
    __m256i ng, nz = _mm256_setzero_si256();
    if (kTernary) {
      const uint8_t* p = wr + 16 * (h >> 1) + 4 * (h & 1);
      nz = _mm256_set1_epi32(static_cast<int>(load_u32(p)));
      ng = _mm256_set1_epi32(static_cast<int>(load_u32(p + 8)));
    } else {
      ng = _mm256_set1_epi32(static_cast<int>(load_u32(wr + 4 * h)));
    }
    for (int j = 0; j < 4; ++j) {
      __m256 s = _mm256_and_ps(_mm256_castsi256_ps(_mm256_sllv_epi32(ng, c.sh[j])), sign);
      __m256 keep = _mm256_setzero_ps();
      if (kTernary)
        keep = _mm256_castsi256_ps(_mm256_srai_epi32(_mm256_sllv_epi32(nz, c.sh[j]), 31));
      for (int r = 0; r < MT; ++r) {
        __m256 v = _mm256_xor_ps(_mm256_loadu_ps(xr[r] + off + 8 * j), s);
        if (kTernary) v = _mm256_and_ps(v, keep);
        acc[r][j % C] = _mm256_add_ps(acc[r][j % C], v);
      }
    }
  }
  for (int r = 0; r < MT; ++r) {
    __m256 t = acc[r][0];
    for (int k = 1; k < C; ++k) t = _mm256_add_ps(t, acc[r][k]);
    out[r] = hsum(t);
  }
}

template <bool kTernary>
void float_kernel(const float* xp, int64_t M, int64_t KW, const uint8_t* w, const float* alpha,
                  const float* bias, int64_t n0, int64_t n1, int64_t N, float* y) {
  const Consts c;
  const int64_t Kp = 64 * KW, wstride = (kTernary ? 16 : 8) * KW;
  for (int64_t m = 0; m < M;) {
    const int mt = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
    const float* xr[4];
    for (int r = 0; r < mt; ++r) xr[r] = xp + (m + r) * Kp;
    for (int64_t n = n0; n < n1; ++n) {
      float out[4];
      const uint8_t* wr = w + n * wstride;
      if (mt == 4) dot_rows<4, kTernary>(xr, KW, wr, c, out);
      else if (mt == 2) dot_rows<2, kTernary>(xr, KW, wr, c, out);
      else dot_rows<1, kTernary>(xr, KW, wr, c, out);
      for (int r = 0; r < mt; ++r) y[(m + r) * N + n] = epilogue_f32(out[r], alpha, bias, n);
    }
    m += mt;
  }
}

void binary_f32_avx2(const float* xp, int64_t M, int64_t KW, const uint8_t* w,
                     const float* alpha, const float* bias, int64_t n0, int64_t n1, int64_t N,
                     float* y) {
  float_kernel<false>(xp, M, KW, w, alpha, bias, n0, n1, N, y);
}

void ternary_f32_avx2(const float* xp, int64_t M, int64_t KW, const uint8_t* w,
                      const float* alpha, const float* bias, int64_t n0, int64_t n1, int64_t N,
                      float* y) {
  float_kernel<true>(xp, M, KW, w, alpha, bias, n0, n1, N, y);
}

// Per-byte popcounts of v.
inline __m256i popcnt_bytes(__m256i v) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                       2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low));
  __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
  return _mm256_add_epi8(lo, hi);
}

inline int64_t hsum64(__m256i v) {
  __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

// Popcounts of (x_r ^ w) for MT activation rows; `nv` full 4-word vectors, then the masked tail
// (lanes `tail_lanes`, bits `tail_bits`).
template <int MT>
inline void xnor_rows(const uint64_t* const* xr, const uint8_t* wr, int64_t nv,
                      __m256i tail_lanes, __m256i tail_bits, int64_t* pop) {
  const __m256i zero = _mm256_setzero_si256();
  __m256i acc[MT];
  for (int r = 0; r < MT; ++r) acc[r] = zero;
  for (int64_t v = 0; v < nv; ++v) {
    __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 32 * v));
    for (int r = 0; r < MT; ++r) {
      __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[r] + 4 * v));
      acc[r] = _mm256_add_epi64(acc[r], _mm256_sad_epu8(popcnt_bytes(_mm256_xor_si256(xv, wv)),
                                                        zero));
    }
  }
  __m256i wv = _mm256_maskload_epi64(reinterpret_cast<const long long*>(wr + 32 * nv),
                                     tail_lanes);
  for (int r = 0; r < MT; ++r) {
    __m256i xv = _mm256_maskload_epi64(reinterpret_cast<const long long*>(xr[r] + 4 * nv),
                                       tail_lanes);
    __m256i d = _mm256_and_si256(_mm256_xor_si256(xv, wv), tail_bits);
    acc[r] = _mm256_add_epi64(acc[r], _mm256_sad_epu8(popcnt_bytes(d), zero));
    pop[r] = hsum64(acc[r]);
  }
}

void xnor_avx2(const uint64_t* xb, const float* beta, int64_t M, int64_t K, const uint8_t* w,
               const float* alpha, const float* bias, int64_t n0, int64_t n1, int64_t N,
               float* y) {
  const int64_t KW = bits_words(K);
  const int64_t nv = (K / 64) / 4;  // vectors of 4 full words
  int64_t lanes[4], bitsm[4];
  for (int l = 0; l < 4; ++l) {
    int64_t i = 4 * nv + l;
    lanes[l] = i < KW ? -1 : 0;
    bitsm[l] = i < KW ? static_cast<int64_t>(word_mask(i, K)) : 0;
  }
  const __m256i tail_lanes = _mm256_setr_epi64x(lanes[0], lanes[1], lanes[2], lanes[3]);
  const __m256i tail_bits = _mm256_setr_epi64x(bitsm[0], bitsm[1], bitsm[2], bitsm[3]);
  for (int64_t m = 0; m < M;) {
    const int mt = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
    const uint64_t* xr[4];
    for (int r = 0; r < mt; ++r) xr[r] = xb + (m + r) * KW;
    for (int64_t n = n0; n < n1; ++n) {
      int64_t pop[4];
      const uint8_t* wr = w + n * 8 * KW;
      if (mt == 4) xnor_rows<4>(xr, wr, nv, tail_lanes, tail_bits, pop);
      else if (mt == 2) xnor_rows<2>(xr, wr, nv, tail_lanes, tail_bits, pop);
      else xnor_rows<1>(xr, wr, nv, tail_lanes, tail_bits, pop);
      for (int r = 0; r < mt; ++r)
        y[(m + r) * N + n] = epilogue_xnor(K, pop[r], alpha[n], beta[m + r], bias, n);
    }
    m += mt;
  }
}

const Kernels kAvx2Kernels = {binary_f32_avx2, ternary_f32_avx2, xnor_avx2};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace bits
}  // namespace qk
