// AVX-512 kernel of gemm_fp8. Decode as the AVX2 kernel: codes become binary16 bits in
// 16-bit lanes (E5M2: code << 8; E4M3: that shifted right arithmetically by one, bit 14
// cleared, = value * 2^-8, normals and subnormals) and vcvtph2ps makes them exact floats.
//   GEMV (M <= 2): 64 codes per step (one 64-byte load, vpunpck{l,h}bw with zeros puts each
//   code in the high byte of a 16-bit lane, four vcvtph2ps; the task first copies x into that
//   in-lane order), four rows of W per pass sharing the x loads; groups that are not a
//   multiple of 64 and per-channel tails take 32-code steps (vpmovzxbw) and 16-code masked
//   ones. Per group two 16-lane FMA partial sums of x * value, added, then y16 = fma(s', c,
//   y16) with s' = 256 s for E4M3 (exact; when 256 s overflows, fma(s, 256 c, y16)) or s for
//   E5M2; y = hsum(y16) + bias. The scale multiplies the exact value, so a one-hot x returns
//   float32(value * s) bit for bit. On Zen 4 (512-bit ops in two halves) the wide step costs
//   ~15 % less per weight than AVX2's decode.
//   GEMM (M > 2): the AVX2 tiled kernel (FMA-bound; the same bits as avx2).
// Numerics: docs/numerics.md "FP8 matmul" (every order there satisfies the same bound).
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() (`__Y = __Y`), which it reports
// as (maybe-)uninitialized wherever they inline: a false positive, silenced for this file.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cmath>
#include <vector>

#include "cpu/gemm/fp8/kernels.h"

namespace qk {
namespace fp8 {
namespace {

// The masked forms with every lane selected: the unmasked ones start from an undefined
// register, which GCC 12 reports as maybe-uninitialized.
inline __m512 cvtph(__m256i h) { return _mm512_maskz_cvtph_ps(0xFFFF, h); }

inline float hsum(__m512 v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_maskz_extractf32x8_ps(0xFF, v, 1));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16-bit lanes holding code << 8 -> binary16 bits of the code's decoded value.
template <int F>
inline __m512i halves(__m512i t) {
  if (F == kFp8E5M2) return t;
  return _mm512_and_si512(_mm512_srai_epi16(t, 1), _mm512_set1_epi16(static_cast<short>(0xBFFF)));
}

// 32 codes at p -> lo (codes 0..15), hi (codes 16..31).
template <int F>
__attribute__((always_inline)) inline void decode32(const uint8_t* p, __m512& lo, __m512& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512i h = halves<F>(_mm512_slli_epi16(_mm512_cvtepu8_epi16(v), 8));
  lo = cvtph(_mm512_castsi512_si256(h));
  hi = cvtph(_mm512_maskz_extracti64x4_epi64(0xF, h, 1));
}

// Up to 16 codes at p (the lanes of mask; the others 0).
template <int F>
__attribute__((always_inline)) inline __m512 decode16(const uint8_t* p, __mmask16 mask) {
  const __m128i v = _mm_maskz_loadu_epi8(mask, p);
  const __m512i h = halves<F>(_mm512_slli_epi16(_mm512_cvtepu8_epi16(_mm256_castsi128_si256(v)), 8));
  return cvtph(_mm512_castsi512_si256(h));
}

// y += s * acc for a group's partial sum acc of decoded values.
template <int F>
inline __m512 apply_scale(float s, __m512 acc, __m512 y) {
  if (F == kFp8E5M2) return _mm512_fmadd_ps(_mm512_set1_ps(s), acc, y);
  const float s256 = s * 256.0f;  // exact whenever finite (a power-of-two multiple)
  if (std::isfinite(s256) || !std::isfinite(s)) return _mm512_fmadd_ps(_mm512_set1_ps(s256), acc, y);
  return _mm512_fmadd_ps(_mm512_set1_ps(s), _mm512_mul_ps(acc, _mm512_set1_ps(256.0f)), y);
}

constexpr int64_t kPrefetch = 1024;  // bytes ahead in each row of W

// 64 codes at p, unpacked with zeros (code << 8 in 16-bit lanes, in-lane order): four vectors,
// the codes 0-7 16-23 | 32-39 48-55 | 8-15 24-31 | 40-47 56-63 (shuffle_x puts x in that order).
template <int F>
__attribute__((always_inline)) inline void decode64(const uint8_t* p, __m512 d[4]) {
  const __m512i v = _mm512_loadu_si512(p);
  const __m512i h0 = halves<F>(_mm512_unpacklo_epi8(_mm512_setzero_si512(), v));
  const __m512i h1 = halves<F>(_mm512_unpackhi_epi8(_mm512_setzero_si512(), v));
  d[0] = cvtph(_mm512_castsi512_si256(h0));
  d[1] = cvtph(_mm512_extracti64x4_epi64(h0, 1));
  d[2] = cvtph(_mm512_castsi512_si256(h1));
  d[3] = cvtph(_mm512_extracti64x4_epi64(h1, 1));
}

// x in decode64's order, per whole block of 64 columns (the rest is not read).
void shuffle_x(const float* x, int64_t k, float* out) {
  const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  for (int64_t e = 0; e + 64 <= k; e += 64) {
    const __m512 x0 = _mm512_loadu_ps(x + e), x1 = _mm512_loadu_ps(x + e + 16);
    const __m512 x2 = _mm512_loadu_ps(x + e + 32), x3 = _mm512_loadu_ps(x + e + 48);
    _mm512_storeu_ps(out + e, _mm512_permutex2var_ps(x0, lo, x1));
    _mm512_storeu_ps(out + e + 16, _mm512_permutex2var_ps(x2, lo, x3));
    _mm512_storeu_ps(out + e + 32, _mm512_permutex2var_ps(x0, hi, x1));
    _mm512_storeu_ps(out + e + 48, _mm512_permutex2var_ps(x2, hi, x3));
  }
}

// y[j .. j + R) for one row x (xs: x in decode64's order).
template <int F, int R>
void gemv_rows(const Fp8Args& a, const float* x, const float* xs, int64_t j, float* y) {
  const int64_t k = a.k, grp = a.group, ng = k / grp;
  const bool wide = grp % 64 == 0 || ng == 1;  // 64-column steps from a multiple of 64
  const uint8_t* p[R];
  const float* s[R];
  __m512 yv[R];
  for (int r = 0; r < R; ++r) {
    p[r] = a.w + (j + r) * k;
    s[r] = a.scales + (j + r) * ng;
    yv[r] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < ng; ++g) {
    __m512 c0[R], c1[R];
    for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
    const int64_t e1 = (g + 1) * grp;
    int64_t e = g * grp;
    for (; wide && e + 64 <= e1; e += 64) {
      const __m512 x0 = _mm512_loadu_ps(xs + e), x1 = _mm512_loadu_ps(xs + e + 16);
      const __m512 x2 = _mm512_loadu_ps(xs + e + 32), x3 = _mm512_loadu_ps(xs + e + 48);
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(p[r] + e + kPrefetch), _MM_HINT_T0);
        __m512 d[4];
        decode64<F>(p[r] + e, d);
        c0[r] = _mm512_fmadd_ps(x0, d[0], c0[r]);
        c1[r] = _mm512_fmadd_ps(x1, d[1], c1[r]);
        c0[r] = _mm512_fmadd_ps(x2, d[2], c0[r]);
        c1[r] = _mm512_fmadd_ps(x3, d[3], c1[r]);
      }
    }
    for (; e + 32 <= e1; e += 32) {
      const __m512 x0 = _mm512_loadu_ps(x + e), x1 = _mm512_loadu_ps(x + e + 16);
      for (int r = 0; r < R; ++r) {
        __m512 lo, hi;
        decode32<F>(p[r] + e, lo, hi);
        c0[r] = _mm512_fmadd_ps(x0, lo, c0[r]);
        c1[r] = _mm512_fmadd_ps(x1, hi, c1[r]);
      }
    }
    for (; e < e1; e += 16) {  // group 16 (odd multiples), per-channel tails K % 32
      const __mmask16 mask = e1 - e >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (e1 - e)) - 1);
      const __m512 x0 = _mm512_maskz_loadu_ps(mask, x + e);
      for (int r = 0; r < R; ++r) c0[r] = _mm512_fmadd_ps(x0, decode16<F>(p[r] + e, mask), c0[r]);
    }
    for (int r = 0; r < R; ++r)
      yv[r] = apply_scale<F>(s[r][g], _mm512_add_ps(c0[r], c1[r]), yv[r]);
  }
  for (int r = 0; r < R; ++r) {
    const float v = hsum(yv[r]);
    y[j + r] = a.bias ? v + a.bias[j + r] : v;
  }
}

template <int F>
void gemv(const Fp8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  thread_local std::vector<float> xbuf;
  xbuf.resize(static_cast<size_t>((m1 - m0) * a.k));
  for (int64_t i = m0; i < m1; ++i) shuffle_x(a.x + i * a.k, a.k, xbuf.data() + (i - m0) * a.k);
  int64_t j = n0;
  for (; j + 4 <= n1; j += 4)  // rows x inner loop: a second row of x finds W in L1
    for (int64_t i = m0; i < m1; ++i)
      gemv_rows<F, 4>(a, a.x + i * a.k, xbuf.data() + (i - m0) * a.k, j, a.y + i * a.n);
  for (; j < n1; ++j)
    for (int64_t i = m0; i < m1; ++i)
      gemv_rows<F, 1>(a, a.x + i * a.k, xbuf.data() + (i - m0) * a.k, j, a.y + i * a.n);
}

void gemm_avx512(const Fp8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (a.m > kFp8GemvRows) {  // by the whole call's M, so a task's result never depends on the split
    avx2_kernels()->gemm(a, m0, m1, n0, n1);
    return;
  }
  if (a.fmt == kFp8E4M3) gemv<kFp8E4M3>(a, m0, m1, n0, n1);
  else gemv<kFp8E5M2>(a, m0, m1, n0, n1);
}

const Kernels kAvx512Kernels = {gemm_avx512};

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace fp8
}  // namespace qk
