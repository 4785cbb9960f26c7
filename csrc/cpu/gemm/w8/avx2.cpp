// AVX2 kernels of the int8-weight matmuls (layout in api.h).
//
// int8 x int8 without VNNI: vpmaddubsw multiplies unsigned by signed bytes. With a = |w|
// (unsigned, exact for w = -128 too) and b = sign(w) * x (x in [-127, 127], so no wrap), a * b
// = w * x, and a pair sum is at most 2 * 128 * 127 = 32512 < 2^15: vpmaddubsw never
// saturates. vpmaddwd by 1 widens the pairs to int32. So the int32 sums are exact, and the
// float epilogue is the shared scalar one written with the same operations in the same order.
// (Widening both operands to int16 for vpmaddwd alone saves the sign op but measured no faster
// on the Zen development machine, and costs a panel per tile; not used.)
//
// W8A16: a GEMV kernel (few rows) converts codes in registers and accumulates with FMA; more
// rows dequantize a 16-column block 256 k at a time into a float panel (16 KiB, L1) and run a
// 6 x 16 FMA micro-kernel over it.
#include <immintrin.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/gemm/w8/kernels.h"
#include "cpu/runtime/aligned.h"

namespace qk {
namespace w8 {
namespace {

constexpr int kMr8 = 4;    // rows per int8 micro-tile (4 x 16 = 8 int32 accumulators)
constexpr int kMrF = 6;    // rows per float micro-tile (6 x 16 = 12 float accumulators)
constexpr int kGemvRows = 3;  // W8A16 tiles of at most this many rows use the GEMV kernel

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Writes 8 columns [col, col + 8) of one output row, only those < n.
inline void store_row8(float* dst, __m256 v, int64_t col, int64_t n) {
  if (col + 8 <= n) {
    _mm256_storeu_ps(dst + col, v);
  } else if (col < n) {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (int64_t j = col; j < n; ++j) dst[j] = t[j - col];
  }
}

inline void store_row8(int32_t* dst, __m256i v, int64_t col, int64_t n) {
  if (col + 8 <= n) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + col), v);
  } else if (col < n) {
    alignas(32) int32_t t[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
    for (int64_t j = col; j < n; ++j) dst[j] = t[j - col];
  }
}

// ---- int8 x int8 -> int32 ----------------------------------------------------------------

// Columns [cc, cc + 8) of row `row`: the int32 sums, or (float(acc) * sx) * sw (+ bias) as
// w8a8_value computes it.
inline void store_s8(__m256i acc, int64_t row, int64_t cc, const W8Out& o) {
  if (o.acc) {
    store_row8(o.acc + row * o.n, acc, cc, o.n);
    return;
  }
  __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(o.sx[row]));
  v = _mm256_mul_ps(v, _mm256_loadu_ps(o.sw + cc));
  if (o.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(o.bias + cc));
  store_row8(o.y + row * o.n, v, cc, o.n);
}

// Rows x[0 .. MR) (stride ldx) times one packed block of `steps` 4-k steps; c[i][h] holds
// columns 8h .. 8h+7 of row i.
template <int MR>
__attribute__((always_inline)) inline void mk_s8(const int8_t* x, int64_t ldx, const int8_t* w,
                                                 int64_t steps, __m256i (&c)[MR][2]) {
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) c[i][0] = c[i][1] = _mm256_setzero_si256();
  for (int64_t s = 0; s < steps; ++s) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * s));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * s + 32));
    const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m256i xb = _mm256_set1_epi32(load_i32(x + i * ldx + 4 * s));
      const __m256i p0 = _mm256_maddubs_epi16(a0, _mm256_sign_epi8(xb, w0));
      const __m256i p1 = _mm256_maddubs_epi16(a1, _mm256_sign_epi8(xb, w1));
      c[i][0] = _mm256_add_epi32(c[i][0], _mm256_madd_epi16(p0, ones));
      c[i][1] = _mm256_add_epi32(c[i][1], _mm256_madd_epi16(p1, ones));
    }
  }
}

template <int MR>
void tile_s8(const int8_t* xq, int64_t row, int64_t k, const int8_t* w, int64_t col,
             const W8Out& o) {
  __m256i c[MR][2];
  mk_s8<MR>(xq + row * k, k, w, w8_padded_k(k) / 4, c);
  // Fully unrolled, so that c stays in registers (an indexed array would live in memory).
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
    store_s8(c[i][0], row + i, col, o);
    store_s8(c[i][1], row + i, col + 8, o);
  }
}

void s8s8_avx2(const int8_t* xq, int64_t m0, int64_t m1, const int8_t* packed, int64_t k,
               int64_t b0, int64_t b1, const W8Out& out) {
  const int64_t kp = w8_padded_k(k);
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* w = packed + b * kW8BlockN * kp;
    const int64_t col = b * kW8BlockN;
    int64_t i = m0;
    for (; i + kMr8 <= m1; i += kMr8) tile_s8<kMr8>(xq, i, k, w, col, out);
    switch (m1 - i) {
      case 3: tile_s8<3>(xq, i, k, w, col, out); break;
      case 2: tile_s8<2>(xq, i, k, w, col, out); break;
      case 1: tile_s8<1>(xq, i, k, w, col, out); break;
      default: break;
    }
  }
}

// ---- float x int8 -> float ---------------------------------------------------------------

// Writes 16 column sums lo (columns 0..7), hi (8..15) of a block through the epilogue.
inline void store_f32_block(__m256 lo, __m256 hi, int64_t row, int64_t col, const W8Out& o) {
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const int64_t cc = col + 8 * h;
    __m256 v = _mm256_mul_ps(h ? hi : lo, _mm256_loadu_ps(o.sw + cc));
    if (o.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(o.bias + cc));
    store_row8(o.y + row * o.n, v, cc, o.n);
  }
}

// One row times one block: codes converted in registers. a[j] holds columns 2j (low half)
// and 2j+1 (high half), one lane per k mod 4.
inline void gemv_block(const float* x, const int8_t* w, int64_t k, int64_t row, int64_t col,
                       const W8Out& o) {
  __m256 a[8];
  for (auto& v : a) v = _mm256_setzero_ps();
  auto step = [&](const int8_t* ws, __m256 xx) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(ws + 8 * j));
      a[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), xx, a[j]);
    }
  };
  const int64_t full = k / 4;
  for (int64_t s = 0; s < full; ++s)
    step(w + 64 * s, _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + 4 * s)));
  if (k % 4) {  // x beyond k is not read (it could be NaN; padding codes are 0)
    alignas(16) float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t kk = 4 * full; kk < k; ++kk) t[kk - 4 * full] = x[kk];
    step(w + 64 * full, _mm256_broadcast_ps(reinterpret_cast<const __m128*>(t)));
  }
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  store_f32_block(_mm256_permutevar8x32_ps(lo, order), _mm256_permutevar8x32_ps(hi, order), row,
                  col, o);
}

// Block (from a 4-k step on) -> panel[k][16] floats, rows k < kp.
void dequant_panel(const int8_t* w, int64_t kp, float* panel) {
  const __m256i shuf = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t s = 0; s < kp / 4; ++s) {
    for (int h = 0; h < 2; ++h) {
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * s + 32 * h));
      // 64-bit word t of v: codes of k = 4s + t, columns 8h .. 8h+7
      v = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, shuf), order);
      const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
      float* p = panel + 4 * s * 16 + 8 * h;
      _mm256_storeu_ps(p, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)));
      _mm256_storeu_ps(p + 16, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))));
      _mm256_storeu_ps(p + 32, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)));
      _mm256_storeu_ps(p + 48, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))));
    }
  }
}

// Rows [row, row + MR) times panel rows [0, kn) (k offset kc of x). Accumulators start at 0
// (first K block) or from cbuf, and go to cbuf, or through the epilogue after the last block:
// one FMA chain per output in k order either way.
template <int MR>
void tile_f32(const float* x, int64_t row, int64_t k, int64_t kc, int64_t kn,
              const float* panel, float* cbuf, bool first, bool last, int64_t col,
              const W8Out& o) {
  __m256 c[MR][2];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    c[i][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(cbuf + 16 * i);
    c[i][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(cbuf + 16 * i + 8);
  }
  const float* xr = x + row * k + kc;
  for (int64_t kk = 0; kk < kn; ++kk) {
    const __m256 p0 = _mm256_load_ps(panel + 16 * kk), p1 = _mm256_load_ps(panel + 16 * kk + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 xb = _mm256_broadcast_ss(xr + i * k + kk);
      c[i][0] = _mm256_fmadd_ps(p0, xb, c[i][0]);
      c[i][1] = _mm256_fmadd_ps(p1, xb, c[i][1]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    if (last) {
      store_f32_block(c[i][0], c[i][1], row + i, col, o);
    } else {
      _mm256_storeu_ps(cbuf + 16 * i, c[i][0]);
      _mm256_storeu_ps(cbuf + 16 * i + 8, c[i][1]);
    }
  }
}

// K block of the panel path: 256 rows of 16 floats (16 KiB) stay in L1 while every row tile
// of the range passes over them.
constexpr int64_t kKc = 256;

void f32_avx2(const float* x, int64_t m0, int64_t m1, const int8_t* packed, int64_t k,
              int64_t b0, int64_t b1, const W8Out& out) {
  const int64_t kp = w8_padded_k(k);
  if (m1 - m0 <= kGemvRows) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t i = m0; i < m1; ++i)
        gemv_block(x + i * k, packed + b * kW8BlockN * kp, k, i, b * kW8BlockN, out);
    return;
  }
  alignas(64) float panel[kKc * kW8BlockN];
  thread_local AlignedVector<float> cbuf;
  if (cbuf.size() < static_cast<size_t>((m1 - m0) * kW8BlockN)) cbuf.resize((m1 - m0) * kW8BlockN);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t col = b * kW8BlockN;
    for (int64_t kc = 0; kc < k; kc += kKc) {
      const int64_t kn = kc + kKc < k ? kKc : k - kc;
      dequant_panel(packed + b * kW8BlockN * kp + kc * kW8BlockN, w8_padded_k(kn), panel);
      const bool first = kc == 0, last = kc + kKc >= k;
      int64_t i = m0;
      auto tile = [&](auto mr) {
        constexpr int kMr = decltype(mr)::value;
        tile_f32<kMr>(x, i, k, kc, kn, panel, cbuf.data() + (i - m0) * kW8BlockN, first, last,
                      col, out);
        i += kMr;
      };
      while (i + kMrF <= m1) tile(std::integral_constant<int, kMrF>());
      switch (m1 - i) {
        case 5: tile(std::integral_constant<int, 5>()); break;
        case 4: tile(std::integral_constant<int, 4>()); break;
        case 3: tile(std::integral_constant<int, 3>()); break;
        case 2: tile(std::integral_constant<int, 2>()); break;
        case 1: tile(std::integral_constant<int, 1>()); break;
        default: break;
      }
    }
  }
}

const Kernels kAvx2Kernels = {s8s8_avx2, f32_avx2, nullptr, nullptr};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace w8
}  // namespace qk
