// AVX-512 kernel of gemm_lut4. The 16-entry table (times the group's scale) is one zmm and
// vpermps reads only the low 4 bits of each 32-bit index, so a dword of packed codes shifted
// right by 4q indexes with its nibble q: one 64-byte load of a row gives 8 index vectors of 16
// codes (lane l, vector q: code 8 l + q) for 7 shifts, against ~24 instructions per 32 codes
// for AVX2's decode.
//   GEMV (1-2 rows of x): the task first copies x into that order (a 16 x 8 transpose per 128
//   columns), shared by every row of W; four rows of W per pass. Groups >= 128 decode with the
//   group's scaled table (table[c] * s, as dequantize_lut) into two FMA partial sums per row;
//   groups of 16/32/64 (several per step) accumulate x * table[c] per step and add that times
//   the lanes' scales (lane l: the group of column 8 l) to the row's sum. The last K % 128
//   columns (groups < 128) take 32-code steps (vpmovzxbd of 16 bytes: even codes, >> 4 the odd
//   ones; group 16: 16-code steps) with the scaled table.
//   GEMM: a 4 x 512 tile of W decoded into L1 in k order (32-code steps, vpermt2ps back to k
//   order), reused by every row of x (4 x 4 zmm dot-product micro-kernel), so decoding costs
//   O(N K) per block of 64 rows of x.
// Numerics: float32 FMA partial sums in another order than scalar.cpp and avx2.cpp (api.h:
// they agree to float32 accumulation error); groups < 128 in the GEMV apply the scale to a
// partial sum of x * table[c] instead of to each weight, so a one-hot x still returns
// table[c] * s bit for bit, and NaN / Inf propagate as in the definition.
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() (`__Y = __Y`), which it reports
// as (maybe-)uninitialized wherever they inline: a false positive, silenced for this file.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu/gemm/lut4/kernels.h"
#include "cpu/gemm/lut4/tiles.h"
#include "cpu/runtime/aligned.h"
#include "cpu/runtime/prefetch.h"
#include "cpu/runtime/simd_f32.h"

namespace qk {
namespace lut4 {
namespace {

// The 16 dwords = the 16 bytes at p (vpermps indices of the even codes; >> 4: the odd ones).
inline __m512i bytes16(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Group 16: lanes 0..7 the even codes of the 8 bytes at p, lanes 8..15 the odd ones.
inline __m512i bytes8(const uint8_t* p) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m512i dd = _mm512_shuffle_i64x2(d, d, 0x44);  // lanes 0..7 twice
  return _mm512_mask_srli_epi32(dd, 0xFF00, dd, 4);
}

// x[e0, e1) in the order of the 32-code (S = 32: per 32 columns the even then the odd ones) or
// 16-code steps (S = 16: per 16 columns the 8 even then the 8 odd ones).
template <int S>
void shuffle_x(const float* x, int64_t e0, int64_t e1, float* out) {
  if (S == 32) {
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    for (int64_t e = e0; e < e1; e += 32) {
      const __m512 a = _mm512_loadu_ps(x + e), b = _mm512_loadu_ps(x + e + 16);
      _mm512_storeu_ps(out + e, _mm512_permutex2var_ps(a, ev, b));
      _mm512_storeu_ps(out + e + 16, _mm512_permutex2var_ps(a, od, b));
    }
  } else {
    const __m512i idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int64_t e = e0; e < e1; e += 16)
      _mm512_storeu_ps(out + e, _mm512_permutexvar_ps(idx, _mm512_loadu_ps(x + e)));
  }
}

// x[0, k128) in the order of the 128-code steps: per 128 columns, vector q (16 floats) holds
// lane l = column 8 l + q (a 16 x 8 transpose).
void shuffle_x128(const float* x, int64_t k128, float* out) {
  for (int64_t e = 0; e < k128; e += 128) {
    __m512 v[8];
    for (int i = 0; i < 8; ++i) v[i] = _mm512_loadu_ps(x + e + 16 * i);
    for (int q = 0; q < 8; ++q) {
      // lane l of (v[2u], v[2u + 1]) pair u: column 8 (4u + l % 4) + q at index (l % 4) 8 + q
      const __m512i idx = _mm512_add_epi32(
          _mm512_setr_epi32(0, 8, 16, 24, 0, 8, 16, 24, 0, 8, 16, 24, 0, 8, 16, 24),
          _mm512_set1_epi32(q));
      __m512 r = _mm512_permutex2var_ps(v[0], idx, v[1]);
      r = _mm512_mask_mov_ps(r, 0x00F0, _mm512_permutex2var_ps(v[2], idx, v[3]));
      r = _mm512_mask_mov_ps(r, 0x0F00, _mm512_permutex2var_ps(v[4], idx, v[5]));
      r = _mm512_mask_mov_ps(r, 0xF000, _mm512_permutex2var_ps(v[6], idx, v[7]));
      _mm512_storeu_ps(out + e + 16 * q, r);
    }
  }
}

inline __m256 half8(__m512 v) { return simd::F32x16::halves(v); }
inline float hsum(__m512 v) { return simd::F32x16::sum(v); }

// 128 codes of a row at p as 8 index vectors: lane l of vector q = code 8 l + q, the nibble at
// bit 4q of dword l (vpermps reads the low 4 bits); one 64-byte load and a shift each.
inline __m512i nibbles(__m512i d, int q) { return _mm512_srlv_epi32(d, _mm512_set1_epi32(4 * q)); }

// One row of x (xs: shuffled, see gemv) against rows [j, j + R) of W. Columns [0, k128) in
// 128-code steps: for groups >= 128, the group's scaled table decodes (weights table[c] * s);
// for smaller groups (several per step) each step accumulates x * table[c] and multiplies the
// partial sums by the lanes' scales (lane l: group of column 8 l). Columns [k128, k) (groups
// < 128 only) in 32- or 16-code steps with the scaled tables.
template <int S, int R>
void gemv_rows(const Lut4Args& a, __m512 table, const float* xs, int64_t j, float* y) {
  const int64_t groups = a.k / a.group, rb = a.k / 2, k128 = a.k / 128 * 128, G = a.group;
  const uint8_t* p[R];
  const float* s[R];
  __m512 c0[R], c1[R];
  for (int r = 0; r < R; ++r) {
    p[r] = a.packed + (j + r) * rb;
    s[r] = a.scales + (j + r - a.scale_row0) * groups;
    c0[r] = c1[r] = _mm512_setzero_ps();
  }
  if (G >= 128) {
    for (int64_t g = 0; g < groups; ++g) {
      __m512 t[R];
      for (int r = 0; r < R; ++r) t[r] = _mm512_mul_ps(table, _mm512_set1_ps(s[r][g]));
      for (int64_t e = g * G; e < (g + 1) * G; e += 128) {
        __m512i d[R];
        for (int r = 0; r < R; ++r) {
          prefetch_l2(p[r] + (e >> 1), R * rb);
          d[r] = _mm512_loadu_si512(p[r] + (e >> 1));
        }
        for (int q = 0; q < 8; q += 2) {
          const __m512 x0 = _mm512_loadu_ps(xs + e + 16 * q), x1 = _mm512_loadu_ps(xs + e + 16 * q + 16);
          for (int r = 0; r < R; ++r) {
            c0[r] = _mm512_fmadd_ps(x0, _mm512_permutexvar_ps(nibbles(d[r], q), t[r]), c0[r]);
            c1[r] = _mm512_fmadd_ps(x1, _mm512_permutexvar_ps(nibbles(d[r], q + 1), t[r]), c1[r]);
          }
        }
      }
    }
  } else {
    // lane l's scale: s[e / G + l / (G / 8)], from the 128 / G scales of the step
    const __m512i lane_group = _mm512_srlv_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(G == 16 ? 1 : G == 32 ? 2 : 3));
    const __mmask16 sm = static_cast<__mmask16>((1u << (128 / G)) - 1);
    for (int64_t e = 0; e < k128; e += 128) {
      __m512i d[R];
      __m512 u0[R], u1[R];
      for (int r = 0; r < R; ++r) {
        prefetch_l2(p[r] + (e >> 1), R * rb);
        d[r] = _mm512_loadu_si512(p[r] + (e >> 1));
        u0[r] = u1[r] = _mm512_setzero_ps();
      }
      for (int q = 0; q < 8; q += 2) {
        const __m512 x0 = _mm512_loadu_ps(xs + e + 16 * q), x1 = _mm512_loadu_ps(xs + e + 16 * q + 16);
        for (int r = 0; r < R; ++r) {
          u0[r] = _mm512_fmadd_ps(x0, _mm512_permutexvar_ps(nibbles(d[r], q), table), u0[r]);
          u1[r] = _mm512_fmadd_ps(x1, _mm512_permutexvar_ps(nibbles(d[r], q + 1), table), u1[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 sv = _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(sm, s[r] + e / G));
        c0[r] = _mm512_fmadd_ps(sv, _mm512_add_ps(u0[r], u1[r]), c0[r]);
      }
    }
    for (int64_t g = k128 / G; g < groups; ++g) {
      __m512 t[R];
      for (int r = 0; r < R; ++r) t[r] = _mm512_mul_ps(table, _mm512_set1_ps(s[r][g]));
      for (int64_t e = g * G; e < (g + 1) * G; e += S) {
        const __m512 x0 = _mm512_loadu_ps(xs + e);
        if (S == 32) {
          const __m512 x1 = _mm512_loadu_ps(xs + e + 16);
          for (int r = 0; r < R; ++r) {
            const __m512i idx = bytes16(p[r] + (e >> 1));
            c0[r] = _mm512_fmadd_ps(x0, _mm512_permutexvar_ps(idx, t[r]), c0[r]);
            c1[r] = _mm512_fmadd_ps(x1, _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), t[r]),
                                    c1[r]);
          }
        } else {
          for (int r = 0; r < R; ++r)
            c0[r] = _mm512_fmadd_ps(x0, _mm512_permutexvar_ps(bytes8(p[r] + (e >> 1)), t[r]),
                                    c0[r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const float v = hsum(_mm512_add_ps(c0[r], c1[r]));
    y[j + r] = a.bias ? v + a.bias[j + r] : v;
  }
}

// Rows [m0, m1) of x (1 or 2) against rows [n0, n1) of W. The task first copies x in the
// decoder's order (128-code steps, then the 32- or 16-code ones), shared by every row of W.
template <int S>
void gemv(const Lut4Args& a, __m512 table, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  thread_local AlignedVector<float> xbuf;
  xbuf.resize(static_cast<size_t>((m1 - m0) * a.k));
  const int64_t k128 = a.k / 128 * 128;
  for (int64_t i = m0; i < m1; ++i) {
    float* xs = xbuf.data() + (i - m0) * a.k;
    shuffle_x128(a.x + i * a.k, k128, xs);
    shuffle_x<S>(a.x + i * a.k, k128, a.k, xs);
  }
  int64_t j = n0;
  for (; j + 4 <= n1; j += 4)  // rows of x inner: a second row finds the rows of W in L1
    for (int64_t i = m0; i < m1; ++i)
      gemv_rows<S, 4>(a, table, xbuf.data() + (i - m0) * a.k, j, a.y + i * a.n);
  for (; j < n1; ++j)
    for (int64_t i = m0; i < m1; ++i)
      gemv_rows<S, 1>(a, table, xbuf.data() + (i - m0) * a.k, j, a.y + i * a.n);
}

// ---- GEMM -----------------------------------------------------------------------------------

constexpr int64_t kNr = 4;    // rows of W per decoded tile
constexpr int64_t kKc = 512;  // columns per decoded tile (a multiple of every group size)
constexpr int kMr = 4;        // rows of x per micro-kernel call

// Decodes W[j][k0, k0 + kc) into dst (kc floats, k order).
void decode_row(const Lut4Args& a, __m512 table, int64_t j, int64_t k0, int64_t kc, float* dst) {
  const uint8_t* p = a.packed + j * (a.k / 2);
  const float* s = a.scales + (j - a.scale_row0) * (a.k / a.group);
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  const __m512i il = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  for (int64_t g0 = k0; g0 < k0 + kc; g0 += a.group) {
    const __m512 t = _mm512_mul_ps(table, _mm512_set1_ps(s[g0 / a.group]));
    int64_t e = g0;
    for (; e + 32 <= g0 + a.group; e += 32) {
      const __m512i idx = bytes16(p + (e >> 1));
      const __m512 ev = _mm512_permutexvar_ps(idx, t);
      const __m512 od = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), t);
      _mm512_store_ps(dst + (e - k0), _mm512_permutex2var_ps(ev, lo, od));
      _mm512_store_ps(dst + (e - k0) + 16, _mm512_permutex2var_ps(ev, hi, od));
    }
    if (e < g0 + a.group)  // group 16
      _mm512_store_ps(dst + (e - k0),
                      _mm512_permutexvar_ps(il, _mm512_permutexvar_ps(bytes8(p + (e >> 1)), t)));
  }
}

// The four horizontal sums of a, b, c, d.
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(half8(a), half8(b)),
                                     _mm256_hadd_ps(half8(c), half8(d)));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// y[i.., j0 + r] += x[i..][k0, k0 + kc) . w[r] for r < nr, for MR rows of x.
template <int MR>
void micro(const float* x, int64_t ldx, const float (*w)[kKc], int64_t kc, float* y,
           int64_t ldy, int64_t nr) {
  __m512 acc[MR][kNr];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < kNr; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t e = 0; e < kc; e += 16) {
    __m512 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(x + i * ldx + e);
    for (int r = 0; r < kNr; ++r) {
      const __m512 wv = _mm512_load_ps(w[r] + e);
      for (int i = 0; i < MR; ++i) acc[i][r] = _mm512_fmadd_ps(xv[i], wv, acc[i][r]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    alignas(16) float s[4];
    _mm_store_ps(s, hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    for (int64_t r = 0; r < nr; ++r) y[i * ldy + r] += s[r];
  }
}

void gemm_tiles(const Lut4Args& a, __m512 table, int64_t m0, int64_t m1, int64_t n0,
                int64_t n1) {
  using Fn = void (*)(const float*, int64_t, const float (*)[kKc], int64_t, float*, int64_t,
                      int64_t);
  static constexpr Fn kFns[kMr] = {micro<1>, micro<2>, micro<3>, micro<4>};
  lut4::gemm_tiles<kNr, kKc>(
      a, m0, m1, n0, n1,
      [&](int64_t j, int64_t k0, int64_t kc, float* dst) { decode_row(a, table, j, k0, kc, dst); },
      [&](int64_t i, int64_t left, int64_t k0, int64_t kc, const float (*w)[kKc], int64_t j0,
          int64_t nr) -> int64_t {
        const int64_t rows = std::min<int64_t>(kMr, left);
        kFns[rows - 1](a.x + i * a.k + k0, a.k, w, kc, a.y + i * a.n + j0, a.n, nr);
        return rows;
      });
}

void gemm_avx512(const Lut4Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const __m512 table = _mm512_loadu_ps(a.table16);
  if (a.m > 2) {  // by the whole call's M, so a task's result never depends on the split
    gemm_tiles(a, table, m0, m1, n0, n1);
    return;
  }
  if (a.group % 32 == 0) gemv<32>(a, table, m0, m1, n0, n1);
  else gemv<16>(a, table, m0, m1, n0, n1);
}

const Kernels kAvx512Kernels = {gemm_avx512};

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace lut4
}  // namespace qk
