// AVX2 kernel of gemm_lut4. Decode: one 32-bit word holds 8 consecutive codes; it is
// broadcast to 8 lanes, lane l shifted right by 4l (vpermps reads only the low 3 bits: the
// index within a half table) and left by 28 - 4l (bit 3 of the code becomes the sign bit, the
// blendv mask choosing the upper half). Two vpermps + one blend of the table pre-multiplied
// by the group's scale give table[c] * s exactly (one float product, as dequantize_lut).
//   GEMV (1-2 rows of x): decode on the fly, two rows of W per pass sharing the x loads.
//   GEMM: decode a 4 x 512 tile of W into L1 once, reuse it for every row of x (2 x 4 FMA
//   micro-kernel), so decoding costs O(N K) per block of 64 rows of x instead of O(M N K).
#include <immintrin.h>

#include <algorithm>

#include "cpu/gemm/lut4/kernels.h"
#include "cpu/gemm/lut4/tiles.h"

namespace qk {
namespace lut4 {
namespace {

// The 16-entry table times one scale, in two registers: vpermps of it gives table[c] * s,
// the same float product as decoding then scaling (one rounding), for 2 multiplies a group.
struct Table {
  __m256 lo, hi;
};

class Decoder {
 public:
  explicit Decoder(const float* table16)
      : lo_(_mm256_loadu_ps(table16)),
        hi_(_mm256_loadu_ps(table16 + 8)),
        shr_(_mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
        shl_(_mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0)) {}

  Table scaled(float s) const {
    const __m256 vs = _mm256_set1_ps(s);
    return {_mm256_mul_ps(lo_, vs), _mm256_mul_ps(hi_, vs)};
  }

  // t[c] of the 8 codes in the 4 bytes at p.
  __attribute__((always_inline)) __m256 values(const Table& t, const uint8_t* p) const {
    __m256i w = _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(p)));
    __m256i idx = _mm256_srlv_epi32(w, shr_);
    __m256 sel = _mm256_castsi256_ps(_mm256_sllv_epi32(w, shl_));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx),
                            _mm256_permutevar8x32_ps(t.hi, idx), sel);
  }

 private:
  __m256 lo_, hi_;
  __m256i shr_, shl_;
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The four horizontal sums of a, b, c, d.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// One row of x against rows j (and j + 1 when two) of W.
template <bool kTwo>
void gemv_rows(const Lut4Args& a, const Decoder& dec, const float* x, int64_t j, float* y) {
  const int64_t groups = a.k / a.group, rb = a.k / 2;
  const uint8_t* p0 = a.packed + j * rb;
  const uint8_t* p1 = p0 + rb;
  const float* s0 = a.scales + (j - a.scale_row0) * groups;
  const float* s1 = s0 + groups;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00;
  for (int64_t g = 0; g < groups; ++g) {
    const Table t0 = dec.scaled(s0[g]);
    const Table t1 = kTwo ? dec.scaled(s1[g]) : t0;
    const int64_t end = (g + 1) * a.group;
    for (int64_t e = g * a.group; e < end; e += 16) {
      const __m256 xa = _mm256_loadu_ps(x + e), xb = _mm256_loadu_ps(x + e + 8);
      const int64_t b = e >> 1;
      c00 = _mm256_fmadd_ps(xa, dec.values(t0, p0 + b), c00);
      c01 = _mm256_fmadd_ps(xb, dec.values(t0, p0 + b + 4), c01);
      if (kTwo) {
        c10 = _mm256_fmadd_ps(xa, dec.values(t1, p1 + b), c10);
        c11 = _mm256_fmadd_ps(xb, dec.values(t1, p1 + b + 4), c11);
      }
    }
  }
  y[j] = hsum(_mm256_add_ps(c00, c01)) + (a.bias ? a.bias[j] : 0.0f);
  if (kTwo) y[j + 1] = hsum(_mm256_add_ps(c10, c11)) + (a.bias ? a.bias[j + 1] : 0.0f);
}

constexpr int64_t kNr = 4;    // rows of W per decoded tile
constexpr int64_t kKc = 512;  // columns per decoded tile (a multiple of every group size)

// Decodes W[j][k0, k0 + kc) into dst (kc floats).
void decode_row(const Lut4Args& a, const Decoder& dec, int64_t j, int64_t k0, int64_t kc,
                float* dst) {
  const uint8_t* p = a.packed + j * (a.k / 2);
  const float* s = a.scales + (j - a.scale_row0) * (a.k / a.group);
  for (int64_t g0 = k0; g0 < k0 + kc; g0 += a.group) {
    const Table t = dec.scaled(s[g0 / a.group]);
    for (int64_t e = g0; e < g0 + a.group; e += 8)
      _mm256_store_ps(dst + (e - k0), dec.values(t, p + (e >> 1)));
  }
}

// y[i.., j0 + r] += x[i..][k0, k0 + kc) . w[r] for r < nr, for one or two rows of x.
template <int kRows>
void micro(const float* x, int64_t ldx, const float (*w)[kKc], int64_t kc, float* y,
           int64_t ldy, int64_t nr) {
  __m256 acc[2][kNr];
  for (int i = 0; i < 2; ++i)
    for (int r = 0; r < kNr; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t e = 0; e < kc; e += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + e);
    const __m256 x1 = kRows == 2 ? _mm256_loadu_ps(x + ldx + e) : x0;
    for (int r = 0; r < kNr; ++r) {
      const __m256 wv = _mm256_load_ps(w[r] + e);
      acc[0][r] = _mm256_fmadd_ps(x0, wv, acc[0][r]);
      if (kRows == 2) acc[1][r] = _mm256_fmadd_ps(x1, wv, acc[1][r]);
    }
  }
  for (int i = 0; i < kRows; ++i) {
    alignas(16) float s[4];
    _mm_store_ps(s, hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    for (int64_t r = 0; r < nr; ++r) y[i * ldy + r] += s[r];
  }
}

void gemm_tiles(const Lut4Args& a, const Decoder& dec, int64_t m0, int64_t m1, int64_t n0,
                int64_t n1) {
  lut4::gemm_tiles<kNr, kKc>(
      a, m0, m1, n0, n1,
      [&](int64_t j, int64_t k0, int64_t kc, float* dst) { decode_row(a, dec, j, k0, kc, dst); },
      [&](int64_t i, int64_t left, int64_t k0, int64_t kc, const float (*w)[kKc], int64_t j0,
          int64_t nr) -> int64_t {
        const float* x = a.x + i * a.k + k0;
        float* y = a.y + i * a.n + j0;
        if (left >= 2) micro<2>(x, a.k, w, kc, y, a.n, nr);
        else micro<1>(x, a.k, w, kc, y, a.n, nr);
        return left >= 2 ? 2 : 1;
      });
}

void gemm_avx2(const Lut4Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const Decoder dec(a.table16);
  if (a.m > 2) {  // by the whole call's M, so a task's result never depends on the split
    gemm_tiles(a, dec, m0, m1, n0, n1);
    return;
  }
  for (int64_t i = m0; i < m1; ++i) {
    const float* x = a.x + i * a.k;
    float* y = a.y + i * a.n;
    int64_t j = n0;
    for (; j + 2 <= n1; j += 2) gemv_rows<true>(a, dec, x, j, y);
    if (j < n1) gemv_rows<false>(a, dec, x, j, y);
  }
}

const Kernels kAvx2Kernels = {gemm_avx2};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace lut4
}  // namespace qk
