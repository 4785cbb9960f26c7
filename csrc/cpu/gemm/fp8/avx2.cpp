// AVX2 kernel of gemm_fp8. Decode without a table: codes become binary16 bit patterns with
// integer ops (E5M2: code << 8; E4M3: arithmetic shift of code << 8 by one, bit 14 cleared,
// = value * 2^-8) and vcvtph2ps makes them float32 exactly.
//   GEMV (M <= 2): four rows of W per pass, 16 codes per row per step, x loads shared; the
//   decoded values (not yet scaled) feed FMA partial sums per group, and the group's scale is
//   applied to the partial sum (E4M3: scale * 256, exact unless it overflows). One decode
//   costs ~9 instructions per 16 weights, so the pass stays near memory bandwidth.
//   GEMM: a 16-row x 256-column tile of W is decoded (8x8 byte transposes) into k-major floats
//   w = value * s, exactly the dequantized weights, and a 6 x 16 register block of y runs one
//   FMA chain per output along k over it; decoding costs O(N K) per block of 96 rows of x.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/gemm/fp8/kernels.h"
#include "cpu/runtime/aligned.h"
#include "cpu/runtime/prefetch.h"

namespace qk {
namespace fp8 {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16-bit lanes holding code << 8 -> binary16 bits of the code's decoded value (see top).
template <int F>
inline __m256i halves(__m256i t) {
  if (F == kFp8E5M2) return t;
  return _mm256_and_si256(_mm256_srai_epi16(t, 1), _mm256_set1_epi16(static_cast<short>(0xBFFF)));
}
template <int F>
inline __m128i halves(__m128i t) {
  if (F == kFp8E5M2) return t;
  return _mm_and_si128(_mm_srai_epi16(t, 1), _mm_set1_epi16(static_cast<short>(0xBFFF)));
}

// 16 codes at p -> lo (codes 0..7), hi (codes 8..15): value (E5M2) or value * 2^-8 (E4M3).
template <int F>
__attribute__((always_inline)) inline void decode16(const uint8_t* p, __m256i spread,
                                                    __m256& lo, __m256& hi) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i h = halves<F>(_mm256_shuffle_epi8(v, spread));
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

// pshufb control: 16-bit lane l of 128-bit half q gets byte 8q + l in its high byte.
inline __m256i spread_control() {
  return _mm256_setr_epi8(-128, 0, -128, 1, -128, 2, -128, 3, -128, 4, -128, 5, -128, 6, -128, 7,
                          -128, 8, -128, 9, -128, 10, -128, 11, -128, 12, -128, 13, -128, 14,
                          -128, 15);
}

// y += s * acc for a group's partial sum acc of decoded values.
template <int F>
inline __m256 apply_scale(float s, __m256 acc, __m256 y) {
  if (F == kFp8E5M2) return _mm256_fmadd_ps(_mm256_set1_ps(s), acc, y);
  const float s256 = s * 256.0f;  // exact whenever finite (a power-of-two multiple)
  if (std::isfinite(s256) || !std::isfinite(s)) return _mm256_fmadd_ps(_mm256_set1_ps(s256), acc, y);
  return _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_mul_ps(acc, _mm256_set1_ps(256.0f)), y);
}

// y[j .. j + R) for one row x. Per group: two 8-lane FMA partial sums (k mod 16 < 8, >= 8),
// added, scaled into an 8-lane y; y summed horizontally at the end, then the bias.
template <int F, int R>
void gemv_rows(const Fp8Args& a, const float* x, int64_t j, float* y) {
  const int64_t k = a.k, grp = a.group, ng = k / grp;
  const __m256i spread = spread_control();
  const uint8_t* p[R];
  const float* s[R];
  __m256 yv[R];
  for (int r = 0; r < R; ++r) {
    p[r] = a.w + (j + r) * k;
    s[r] = a.scales + (j + r) * ng;
    yv[r] = _mm256_setzero_ps();
  }
  for (int64_t g = 0; g < ng; ++g) {
    __m256 c0[R], c1[R];
    for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
    const int64_t e1 = (g + 1) * grp;
    int64_t e = g * grp;
    for (; e + 16 <= e1; e += 16) {
      const __m256 x0 = _mm256_loadu_ps(x + e), x1 = _mm256_loadu_ps(x + e + 8);
      if ((e & 63) == 0)
        for (int r = 0; r < R; ++r)
          prefetch_l2(p[r] + e, R * k);
      for (int r = 0; r < R; ++r) {
        __m256 lo, hi;
        decode16<F>(p[r] + e, spread, lo, hi);
        c0[r] = _mm256_fmadd_ps(x0, lo, c0[r]);
        c1[r] = _mm256_fmadd_ps(x1, hi, c1[r]);
      }
    }
    if (e < e1) {  // per-channel rows with K % 16 != 0: zero-padded copies of the tail
      alignas(32) float xt[16] = {};
      alignas(16) uint8_t bt[16] = {};
      std::copy(x + e, x + e1, xt);
      const __m256 x0 = _mm256_load_ps(xt), x1 = _mm256_load_ps(xt + 8);
      for (int r = 0; r < R; ++r) {
        std::copy(p[r] + e, p[r] + e1, bt);
        __m256 lo, hi;
        decode16<F>(bt, spread, lo, hi);
        c0[r] = _mm256_fmadd_ps(x0, lo, c0[r]);
        c1[r] = _mm256_fmadd_ps(x1, hi, c1[r]);
      }
    }
    for (int r = 0; r < R; ++r) yv[r] = apply_scale<F>(s[r][g], _mm256_add_ps(c0[r], c1[r]), yv[r]);
  }
  for (int r = 0; r < R; ++r) {
    const float v = hsum(yv[r]);
    y[j + r] = a.bias ? v + a.bias[j + r] : v;
  }
}

template <int F>
void gemv(const Fp8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t j = n0;
  for (; j + 4 <= n1; j += 4)  // rows x outer loop: a second row of x finds W in L1
    for (int64_t i = m0; i < m1; ++i) gemv_rows<F, 4>(a, a.x + i * a.k, j, a.y + i * a.n);
  for (; j < n1; ++j)
    for (int64_t i = m0; i < m1; ++i) gemv_rows<F, 1>(a, a.x + i * a.k, j, a.y + i * a.n);
}

// ---- GEMM -----------------------------------------------------------------------------------

constexpr int64_t kNr = 16;   // rows of W per decoded tile (two vectors of y)
constexpr int64_t kKc = 256;  // columns of W per decoded tile (16 KiB of floats: L1)
constexpr int kMr = 6;        // rows of x per register block (12 accumulators)

// Codes (k0 + 2q, k0 + 2q + 1) of 8 rows, bytes 0..7 and 8..15 of v[q], from 8 bytes per row.
inline void transpose8x8(const uint8_t* const* rows, int64_t e, __m128i v[4]) {
  __m128i r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows[i] + e));
  const __m128i t01 = _mm_unpacklo_epi8(r[0], r[1]), t23 = _mm_unpacklo_epi8(r[2], r[3]);
  const __m128i t45 = _mm_unpacklo_epi8(r[4], r[5]), t67 = _mm_unpacklo_epi8(r[6], r[7]);
  const __m128i u0 = _mm_unpacklo_epi16(t01, t23), u1 = _mm_unpackhi_epi16(t01, t23);
  const __m128i u2 = _mm_unpacklo_epi16(t45, t67), u3 = _mm_unpackhi_epi16(t45, t67);
  v[0] = _mm_unpacklo_epi32(u0, u2);
  v[1] = _mm_unpackhi_epi32(u0, u2);
  v[2] = _mm_unpacklo_epi32(u1, u3);
  v[3] = _mm_unpackhi_epi32(u1, u3);
}

// W rows [j0, j0 + 16) x columns [k0, k0 + kc) as k-major floats t[(k - k0) * 16 + r] =
// fp8_value * s (the exact dequantized weight). Rows past n repeat row n - 1 (never stored).
template <int F>
void decode_tile(const Fp8Args& a, int64_t j0, int64_t k0, int64_t kc, float* t) {
  const int64_t ng = a.k / a.group, kend = k0 + kc;
  const __m128i zero = _mm_setzero_si128();
  for (int half = 0; half < 2; ++half) {
    const uint8_t* rows[8];
    const float* srow[8];
    for (int r = 0; r < 8; ++r) {
      const int64_t jj = std::min(j0 + 8 * half + r, a.n - 1);
      rows[r] = a.w + jj * a.k;
      srow[r] = a.scales + jj * ng;
    }
    float* th = t + 8 * half;
    int64_t e = k0, gcur = -1;
    __m256 sv = _mm256_setzero_ps();
    for (; e + 8 <= kend; e += 8) {
      const int64_t g = e / a.group;  // 8 columns never straddle a group (G % 16 == 0 or G = K)
      if (g != gcur) {
        gcur = g;
        sv = _mm256_setr_ps(srow[0][g], srow[1][g], srow[2][g], srow[3][g], srow[4][g],
                            srow[5][g], srow[6][g], srow[7][g]);
      }
      __m128i v[4];
      transpose8x8(rows, e, v);
      for (int q = 0; q < 4; ++q) {
        __m256 f0 = _mm256_cvtph_ps(halves<F>(_mm_unpacklo_epi8(zero, v[q])));
        __m256 f1 = _mm256_cvtph_ps(halves<F>(_mm_unpackhi_epi8(zero, v[q])));
        if (F == kFp8E4M3) {
          f0 = _mm256_mul_ps(f0, _mm256_set1_ps(256.0f));
          f1 = _mm256_mul_ps(f1, _mm256_set1_ps(256.0f));
        }
        _mm256_store_ps(th + (e - k0 + 2 * q) * kNr, _mm256_mul_ps(f0, sv));
        _mm256_store_ps(th + (e - k0 + 2 * q + 1) * kNr, _mm256_mul_ps(f1, sv));
      }
    }
    for (; e < kend; ++e)  // per-channel rows with K % 8 != 0
      for (int r = 0; r < 8; ++r)
        th[(e - k0) * kNr + r] = fp8_value(rows[r][e], a.fmt) * srow[r][e / a.group];
  }
}

// acc (MR rows x 16 columns, stored in yb with row stride 16) continues its FMA chains over
// the kc columns of the tile.
// Row i's two accumulators; named variables, not an array: GCC kept an accumulator array in
// memory, storing it back every iteration.
#define QK_FP8_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)

template <int MR>
void micro(const float* x, int64_t ldx, const float* t, int64_t kc, float* yb) {
#define QK_DECL(i) __m256 a##i##0 = _mm256_setzero_ps(), a##i##1 = a##i##0;
  QK_FP8_ROWS(QK_DECL)
#define QK_LOAD(i)                                 \
  if constexpr (i < MR) {                          \
    a##i##0 = _mm256_load_ps(yb + i * kNr);        \
    a##i##1 = _mm256_load_ps(yb + i * kNr + 8);    \
  }
  QK_FP8_ROWS(QK_LOAD)
  for (int64_t e = 0; e < kc; ++e) {
    const __m256 w0 = _mm256_load_ps(t + e * kNr), w1 = _mm256_load_ps(t + e * kNr + 8);
#define QK_FMA(i)                                               \
  if constexpr (i < MR) {                                       \
    const __m256 xb = _mm256_broadcast_ss(x + i * ldx + e);     \
    a##i##0 = _mm256_fmadd_ps(xb, w0, a##i##0);                 \
    a##i##1 = _mm256_fmadd_ps(xb, w1, a##i##1);                 \
  }
    QK_FP8_ROWS(QK_FMA)
  }
#define QK_STORE(i)                                \
  if constexpr (i < MR) {                          \
    _mm256_store_ps(yb + i * kNr, a##i##0);        \
    _mm256_store_ps(yb + i * kNr + 8, a##i##1);    \
  }
  QK_FP8_ROWS(QK_STORE)
#undef QK_DECL
#undef QK_LOAD
#undef QK_FMA
#undef QK_STORE
}
#undef QK_FP8_ROWS

void micro_rows(int rows, const float* x, int64_t ldx, const float* t, int64_t kc, float* yb) {
  using Fn = void (*)(const float*, int64_t, const float*, int64_t, float*);
  static constexpr Fn kFns[kMr] = {micro<1>, micro<2>, micro<3>, micro<4>, micro<5>, micro<6>};
  kFns[rows - 1](x, ldx, t, kc, yb);
}

// Chunks of K outer (the x chunk of the task's rows stays in L2), tiles of 16 rows of W inner;
// y accumulates in a task-local buffer, one FMA chain per output in k order, then the bias.
template <int F>
void gemm(const Fp8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t rows = m1 - m0, tiles = (n1 - n0 + kNr - 1) / kNr;
  thread_local AlignedVector<float> tbuf_v, ybuf_v;
  tbuf_v.resize(kKc * kNr + 8);
  // resize + memset, not assign(n, 0.0f): vector<float>::assign instantiated in this file is
  // compiled with AVX2 and could be the copy the linker keeps for the scalar files too
  // (tests/test_isa_symbols.py)
  const size_t ylen = static_cast<size_t>(rows * tiles * kNr) + 8;
  if (ybuf_v.size() < ylen) ybuf_v.resize(ylen);
  std::memset(ybuf_v.data(), 0, ylen * sizeof(float));
  float* tbuf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(tbuf_v.data()) + 31) & ~uintptr_t{31});
  float* ybuf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(ybuf_v.data()) + 31) & ~uintptr_t{31});
  for (int64_t k0 = 0; k0 < a.k; k0 += kKc) {
    const int64_t kc = std::min(kKc, a.k - k0);
    for (int64_t tj = 0; tj < tiles; ++tj) {
      decode_tile<F>(a, n0 + tj * kNr, k0, kc, tbuf);
      float* yt = ybuf + tj * rows * kNr;
      for (int64_t i = 0; i < rows; i += kMr) {
        const int r = static_cast<int>(std::min<int64_t>(kMr, rows - i));
        micro_rows(r, a.x + (m0 + i) * a.k + k0, a.k, tbuf, kc, yt + i * kNr);
      }
    }
  }
  for (int64_t tj = 0; tj < tiles; ++tj) {
    const int64_t j0 = n0 + tj * kNr, nr = std::min(kNr, n1 - j0);
    const float* yt = ybuf + tj * rows * kNr;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t r = 0; r < nr; ++r) {
        const float v = yt[i * kNr + r];
        a.y[(m0 + i) * a.n + j0 + r] = a.bias ? v + a.bias[j0 + r] : v;
      }
  }
}

void gemm_avx2(const Fp8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const bool e4m3 = a.fmt == kFp8E4M3;
  if (a.m <= kFp8GemvRows) {  // by the whole call's M, so a task's result never depends on the split
    if (e4m3) gemv<kFp8E4M3>(a, m0, m1, n0, n1);
    else gemv<kFp8E5M2>(a, m0, m1, n0, n1);
    return;
  }
  if (e4m3) gemm<kFp8E4M3>(a, m0, m1, n0, n1);
  else gemm<kFp8E5M2>(a, m0, m1, n0, n1);
}

const Kernels kAvx2Kernels = {gemm_avx2, nullptr};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace fp8
}  // namespace qk
