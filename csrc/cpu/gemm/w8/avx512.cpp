// AVX-512 (VNNI) kernels of the int8-weight matmuls (layout in api.h): one packed 4-k step of a
// block is 64 bytes = 16 columns x 4 k, exactly one zmm.
//
// int8 x int8: vpdpbusd multiplies unsigned by signed bytes and adds each group of 4 products
// to an int32 lane (no saturation; the lane wraps mod 2^32). The weights are the unsigned
// operand: u = w ^ 0x80 = w + 128 in [0, 255], the activation codes x the signed one, so
//     sum_k u * x = sum_k w * x + 128 * sum_k x,
// and the kernel subtracts 128 * rowsum(x) (exact, K * 127 * 128 < 2^31) from each sum. Both
// sums run over the same bytes, the whole 4-k steps: the bytes past k of a row (the next row's
// codes or the 3 spare bytes api.h asks for) meet padding codes w = 0, u = 128, in the first sum
// and cancel exactly in the second. int32 arithmetic wraps, so the result is the exact int32
// sum, bit-identical to the scalar kernel; the float epilogue is the shared w8a8_value with
// the same operations in the same order.
//
// The micro-kernel holds MR rows x NR blocks of int32 sums (8 x 3 = 24 zmm); per 4-k step it
// loads NR weight vectors and MR broadcast activation words. A task walks groups of NR blocks,
// and inside a group every MR-row tile, so a group's weights stay in L1/L2 while its rows pass;
// the weight streams are prefetched (the first row tile of a group reads them from memory).
// The row sums are computed once per call (xsums_avx512, W8Out::xsum). On one Zen 4 core
// (vpdpbusd zmm peak 1 per cycle, ~233 GMAC/s) the kernel runs M = 512 x 4096 x 4096 at
// ~222 GMAC/s; GEMVs (M = 1) stream the weights at the read bandwidth.
#include <immintrin.h>

#include <cstring>

#include "cpu/gemm/tile/vnni_avx512.h"
#include "cpu/gemm/w8/epilogue_avx512.h"
#include "cpu/gemm/w8/kernels.h"

namespace qk {
namespace w8 {
namespace {

constexpr int kMr = 8;  // rows per int8 micro-tile
constexpr int kNr = 3;  // 16-column blocks per int8 micro-tile
// Prefetch distances, bytes ahead of each weight stream (a prefetch never faults).
constexpr int64_t kPrefetch = 512, kPrefetchL2 = 4096;

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---- int8 x int8 -> int32 ----------------------------------------------------------------

// 128 * sum of the bytes x[0 .. kp) (the bytes the micro-kernel reads for one row).
int32_t rowsum128(const int8_t* x, int64_t kp) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i s = _mm512_setzero_si512();
  int64_t kk = 0;
  for (; kk + 64 <= kp; kk += 64) s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(x + kk));
  if (kk < kp) {
    const __mmask64 m = (~__mmask64{0}) >> (64 - (kp - kk));
    s = _mm512_dpbusd_epi32(s, ones, _mm512_maskz_loadu_epi8(m, x + kk));
  }
  alignas(64) int32_t lane[16];
  _mm512_store_si512(lane, s);
  uint32_t sum = 0;  // wraps like the vector lanes (the true value fits: k <= kW8A8MaxK)
  for (int32_t v : lane) sum += static_cast<uint32_t>(v);
  return static_cast<int32_t>(sum << 7);
}

// Rows x[0 .. MR) (stride ldx) times NR blocks (stride ws) over `steps` 4-k steps.
template <int MR, int NR>
__attribute__((always_inline)) inline void mk_s8(const int8_t* x, int64_t ldx, const int8_t* w,
                                                 int64_t ws, int64_t steps,
                                                 __m512i (&c)[MR][NR]) {
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) c[i][j] = _mm512_setzero_si512();
  const int8_t* xr[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) xr[i] = x + i * ldx;
#pragma GCC unroll 2
  for (int64_t s = 0; s < steps; ++s) {
    __m512i u[NR];
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + j * ws + 64 * s + kPrefetch), _MM_HINT_T0);
      if (MR >= 4)  // and into L2 from further ahead where the tile computes longer per step
        _mm_prefetch(reinterpret_cast<const char*>(w + j * ws + 64 * s + kPrefetchL2), _MM_HINT_T1);
      u[j] = _mm512_xor_si512(_mm512_loadu_si512(w + j * ws + 64 * s), bias);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i xb = _mm512_set1_epi32(load_i32(xr[i] + 4 * s));
#pragma GCC unroll 3
      for (int j = 0; j < NR; ++j) c[i][j] = vnni::dpbusd(c[i][j], u[j], xb);
    }
  }
}

template <int MR, int NR>
void tile_s8(const int8_t* xq, int64_t row, int64_t k, const int8_t* w, int64_t ws, int64_t col,
             const int32_t* comp, const W8Out& o) {
  __m512i c[MR][NR];
  mk_s8<MR, NR>(xq + row * k, k, w, ws, w8_padded_k(k) / 4, c);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) store_s8(c[i][j], comp[i], row + i, col + 16 * j, o);
}

template <int NR>
void rows_s8(const int8_t* xq, int64_t m0, int64_t m1, int64_t k, const int8_t* w, int64_t ws,
             int64_t col, const int32_t* comp, const W8Out& o) {
  int64_t i = m0;
  for (; i + kMr <= m1; i += kMr) tile_s8<kMr, NR>(xq, i, k, w, ws, col, comp + (i - m0), o);
  const int32_t* cp = comp + (i - m0);
  switch (m1 - i) {
    case 7: tile_s8<7, NR>(xq, i, k, w, ws, col, cp, o); break;
    case 6: tile_s8<6, NR>(xq, i, k, w, ws, col, cp, o); break;
    case 5: tile_s8<5, NR>(xq, i, k, w, ws, col, cp, o); break;
    case 4: tile_s8<4, NR>(xq, i, k, w, ws, col, cp, o); break;
    case 3: tile_s8<3, NR>(xq, i, k, w, ws, col, cp, o); break;
    case 2: tile_s8<2, NR>(xq, i, k, w, ws, col, cp, o); break;
    case 1: tile_s8<1, NR>(xq, i, k, w, ws, col, cp, o); break;
    default: break;
  }
}

}  // namespace

void s8s8_avx512(const int8_t* xq, int64_t m0, int64_t m1, const int8_t* packed, int64_t k,
                 int64_t b0, int64_t b1, const W8Out& out) {
  const int64_t ws = kW8BlockN * w8_padded_k(k);
  const int32_t* comp = out.xsum + m0;
  for (int64_t b = b0; b < b1; b += kNr) {
    const int8_t* w = packed + b * ws;
    const int64_t col = b * kW8BlockN;
    switch (b1 - b < kNr ? b1 - b : kNr) {
      case 3: rows_s8<3>(xq, m0, m1, k, w, ws, col, comp, out); break;
      case 2: rows_s8<2>(xq, m0, m1, k, w, ws, col, comp, out); break;
      default: rows_s8<1>(xq, m0, m1, k, w, ws, col, comp, out); break;
    }
  }
}

// 128 * the row sums of the bytes the micro-kernel reads (the whole 4-k steps).
void xsums_avx512(const int8_t* xq, int64_t m, int64_t k, int32_t* out) {
  for (int64_t i = 0; i < m; ++i) out[i] = rowsum128(xq + i * k, w8_padded_k(k));
}

namespace {
const Kernels kAvx512Kernels = {s8s8_avx512, f32_avx512, xsums_avx512, nullptr};
}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace w8
}  // namespace qk
