// AVX-512 kernel of gemm_fp8. Decode as the AVX2 kernel: codes become binary16 bits in
// 16-bit lanes (E5M2: code << 8; E4M3: that shifted right arithmetically by one, bit 14
// cleared, = value * 2^-8, normals and subnormals) and vcvtph2ps makes them exact floats.
//   GEMV (M <= 4): 64 codes per step (one 64-byte load, vpunpck{l,h}bw with zeros puts each
//   code in the high byte of a 16-bit lane, four vcvtph2ps; the task first copies x into that
//   in-lane order); M = 1: four rows of W per pass sharing the x loads; M = 2..4: each row of W
//   decoded once for all rows of x. Groups that are not a multiple of 64 and per-channel tails
//   take 32-code steps (vpmovzxbw) and 16-code masked ones. Per group and output FMA partial
//   sums of x * value (two for M <= 2: k mod 32 < 16, >= 16; one for M = 3, 4), then y16 =
//   fma(s', c, y16) with s' = 256 s for E4M3 (exact; when 256 s overflows, fma(s, 256 c, y16))
//   or s for E5M2; y = hsum(y16) + bias. The scale multiplies the exact value, so a one-hot x
//   returns float32(value * s) bit for bit. On Zen 4 (512-bit ops in two halves) the 64-code
//   step costs ~15 % less per weight than AVX2's decode; M = 2..4 decode once, not M times.
//   GEMM (M > 4): the AVX2 tiled kernel (FMA-bound; the same bits as avx2).
// Numerics: docs/numerics.md "FP8 matmul" (every order there satisfies the same bound).
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() (`__Y = __Y`), which it reports
// as (maybe-)uninitialized wherever they inline: a false positive, silenced for this file.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/gemm/fp8/kernels.h"
#include "cpu/runtime/aligned.h"
#include "cpu/runtime/prefetch.h"
#include "cpu/runtime/simd_f32.h"

namespace qk {
namespace fp8 {
namespace {

// The masked forms with every lane selected: the unmasked ones start from an undefined
// register, which GCC 12 reports as maybe-uninitialized.
inline __m512 cvtph(__m256i h) { return _mm512_maskz_cvtph_ps(0xFFFF, h); }

inline float hsum(__m512 v) { return simd::F32x16::sum(v); }

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

constexpr int64_t kFewRows = 4;  // M up to which the GEMM decodes on the fly too

// y[i][j .. j + R) for MR rows i of x (x, xs: row i at + i k; xs in decode64's order; y row i
// at + i n): each step's codes decoded once for every row of x.
template <int F, int R, int MR>
void rows(const Fp8Args& a, const float* x, const float* xs, int64_t j, float* y) {
  constexpr bool kTwo = MR <= 2;  // two partial sums per output (registers allowing)
  const int64_t k = a.k, grp = a.group, ng = k / grp;
  const bool wide = grp % 64 == 0 || ng == 1;  // 64-column steps from a multiple of 64
  const uint8_t* p[R];
  const float* s[R];
  __m512 yv[R][MR];
  for (int r = 0; r < R; ++r) {
    p[r] = a.w + (j + r) * k;
    s[r] = a.scales + (j + r) * ng;
    for (int i = 0; i < MR; ++i) yv[r][i] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < ng; ++g) {
    __m512 c0[R][MR], c1[R][MR];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MR; ++i) c0[r][i] = c1[r][i] = _mm512_setzero_ps();
    const int64_t e1 = (g + 1) * grp;
    int64_t e = g * grp;
    for (; wide && e + 64 <= e1; e += 64) {
      __m512 d[R][4];
      for (int r = 0; r < R; ++r) {
        prefetch_l2(p[r] + e, R * k);
        decode64<F>(p[r] + e, d[r]);
      }
      for (int i = 0; i < MR; ++i)
        for (int q = 0; q < 4; ++q) {
          const __m512 xv = _mm512_loadu_ps(xs + i * k + e + 16 * q);
          for (int r = 0; r < R; ++r) {
            if (kTwo && (q & 1)) c1[r][i] = _mm512_fmadd_ps(xv, d[r][q], c1[r][i]);
            else c0[r][i] = _mm512_fmadd_ps(xv, d[r][q], c0[r][i]);
          }
        }
    }
    for (; e + 32 <= e1; e += 32) {
      __m512 lo[R], hi[R];
      for (int r = 0; r < R; ++r) decode32<F>(p[r] + e, lo[r], hi[r]);
      for (int i = 0; i < MR; ++i) {
        const __m512 x0 = _mm512_loadu_ps(x + i * k + e), x1 = _mm512_loadu_ps(x + i * k + e + 16);
        for (int r = 0; r < R; ++r) {
          c0[r][i] = _mm512_fmadd_ps(x0, lo[r], c0[r][i]);
          if (kTwo) c1[r][i] = _mm512_fmadd_ps(x1, hi[r], c1[r][i]);
          else c0[r][i] = _mm512_fmadd_ps(x1, hi[r], c0[r][i]);
        }
      }
    }
    for (; e < e1; e += 16) {  // group 16 (odd multiples), per-channel tails K % 32
      const __mmask16 mask = e1 - e >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (e1 - e)) - 1);
      __m512 w[R];
      for (int r = 0; r < R; ++r) w[r] = decode16<F>(p[r] + e, mask);
      for (int i = 0; i < MR; ++i) {
        const __m512 x0 = _mm512_maskz_loadu_ps(mask, x + i * k + e);
        for (int r = 0; r < R; ++r) c0[r][i] = _mm512_fmadd_ps(x0, w[r], c0[r][i]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MR; ++i)
        yv[r][i] = apply_scale<F>(s[r][g], kTwo ? _mm512_add_ps(c0[r][i], c1[r][i]) : c0[r][i],
                                  yv[r][i]);
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MR; ++i) {
      const float v = hsum(yv[r][i]);
      y[i * a.n + j + r] = a.bias ? v + a.bias[j + r] : v;
    }
}

// M <= kFewRows: every row of W read once and decoded on the fly (M = 1: four rows of W per
// pass; else one row of W for all the rows of x).
template <int F, int MR>
void few_rows(const Fp8Args& a, const float* xs, int64_t m0, int64_t n0, int64_t n1) {
  const float* x = a.x + m0 * a.k;
  float* y = a.y + m0 * a.n;
  int64_t j = n0;
  if (MR == 1)
    for (; j + 4 <= n1; j += 4) rows<F, 4, 1>(a, x, xs, j, y);
  for (; j < n1; ++j) rows<F, 1, MR>(a, x, xs, j, y);
}

template <int F>
void gemv(const Fp8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  thread_local AlignedVector<float> xbuf;
  xbuf.resize(static_cast<size_t>((m1 - m0) * a.k));
  for (int64_t i = m0; i < m1; ++i) shuffle_x(a.x + i * a.k, a.k, xbuf.data() + (i - m0) * a.k);
  using Fn = void (*)(const Fp8Args&, const float*, int64_t, int64_t, int64_t);
  static constexpr Fn kFns[kFewRows] = {few_rows<F, 1>, few_rows<F, 2>, few_rows<F, 3>,
                                        few_rows<F, 4>};
  kFns[m1 - m0 - 1](a, xbuf.data(), m0, n0, n1);
}

void gemm_avx512(const Fp8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (a.m > kFewRows) {  // by the whole call's M, so a task's result never depends on the split
    avx2_kernels()->gemm(a, m0, m1, n0, n1);
    return;
  }
  if (a.fmt == kFp8E4M3) gemv<kFp8E4M3>(a, m0, m1, n0, n1);
  else gemv<kFp8E5M2>(a, m0, m1, n0, n1);
}

const Kernels kAvx512Kernels = {gemm_avx512, nullptr};

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace fp8
}  // namespace qk
