// AVX-512 gemm_vq8 (api.h): VBMI byte permutations look the codes up in register tables (one
// plane of 256 bytes per dimension: 1, 2 or 4 registers by kc), vpdpbusd multiplies 16 rows x
// 4 vectors at a time by the broadcast activation word. The tables hold w + 128 (unsigned);
// float(acc) - 128 * xs is the exact dot product (api.h). Without VBMI: the AVX2 loop.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "cpu/gemm/tile/vnni_avx512.h"
#include "cpu/gemm/vq8/kernels.h"
#include "cpu/gemm/vq8/lookup_avx512.h"
#include "cpu/runtime/aligned.h"

namespace qk {
namespace vq8 {
namespace {

// The 16 rows' scales of block of 32 `blk` (api.h row_scale).
inline __m512 scales_of(const Problem& p, int64_t b, int64_t blk) {
  alignas(64) float s[kVq8Rows];
  for (int64_t l = 0; l < kVq8Rows; ++l) s[l] = row_scale(p, b * kVq8Rows + l, blk);
  return _mm512_load_ps(s);
}

// The float step of block of 32 `blk` for rows i0 .. i0 + MR - 1 (acc: their sums of
// (w + 128) xq): yacc += (float(acc) - 128 xs) * (dx * s), the definition's D = float(acc) -
// 128 xs being exact; sv / seg: the 16 rows' segment scales, reloaded when the segment changes.
template <int MR>
inline void block_epilogue(const Problem& p, int64_t b, int64_t blk, int64_t i0,
                           const __m512i (&acc)[MR], __m512 (&yacc)[MR], __m512& sv,
                           int64_t& seg) {
  if (blk * p.nseg / p.nblk != seg) {
    seg = blk * p.nseg / p.nblk;
    sv = scales_of(p, b, blk);
  }
  for (int mi = 0; mi < MR; ++mi) {
    const int64_t j = (i0 + mi) * p.nblk + blk;
    const __m512 f = _mm512_sub_ps(_mm512_cvtepi32_ps(acc[mi]), _mm512_set1_ps(128.0f * p.xs[j]));
    const __m512 tt = _mm512_mul_ps(_mm512_set1_ps(p.dx[j]), sv);
    yacc[mi] = _mm512_add_ps(yacc[mi], _mm512_mul_ps(f, tt));
  }
}

// x rows i0 .. i0 + MR - 1 of block b.
template <int DIM, int NT, int MR, bool NIB>
QK_VBMI uint32_t rows_vbmi(const Problem& p, int64_t b, const __m512i (&t)[DIM][NT], int64_t i0,
                           float* out) {
  constexpr int64_t qpb = 8 / DIM;  // code groups per block of 32 columns
  const int64_t nq = p.nv / kVq8Group;
  const uint8_t* codes = p.packed4 + b * block_bytes(p);
  const __m512i low4 = _mm512_set1_epi8(15);
  __m512i pair = _mm512_setzero_si512();  // NIB: the byte pair of groups q & ~1, q | 1
  const uint32_t* xp[MR];
  __m512 yacc[MR];
  for (int mi = 0; mi < MR; ++mi) {
    xp[mi] = p.xp + (i0 + mi) * nq * DIM;
    yacc[mi] = _mm512_setzero_ps();
  }
  __m512i top = _mm512_setzero_si512();
  __m512 sv = _mm512_set1_ps(1.0f);
  int64_t seg = -1;
  for (int64_t blk = 0, q = 0; blk < p.nblk; ++blk) {
    __m512i acc[MR];
    for (int mi = 0; mi < MR; ++mi) acc[mi] = _mm512_setzero_si512();
    for (int64_t e = 0; e < qpb; ++e, ++q) {
      __m512i c;
      if constexpr (NIB) {
        if (q % 2 == 0) {
          pair = _mm512_loadu_si512(codes + q / 2 * 64);
          c = _mm512_and_si512(pair, low4);
        } else {
          c = _mm512_and_si512(_mm512_srli_epi16(pair, 4), low4);
        }
      } else {
        c = _mm512_loadu_si512(codes + q * 64);
      }
      top = _mm512_max_epu8(top, c);
      const __mmask64 hi = NT == 4 ? _mm512_movepi8_mask(c) : 0;
      for (int d = 0; d < DIM; ++d) {
        const __m512i w = lookup<NT>(t[d], c, hi);
        for (int mi = 0; mi < MR; ++mi)
          acc[mi] = vnni::dpbusd_x4(acc[mi], w,
                                    reinterpret_cast<const int8_t*>(xp[mi] + q * DIM + d));
      }
    }
    block_epilogue<MR>(p, b, blk, i0, acc, yacc, sv, seg);
  }
  for (int mi = 0; mi < MR; ++mi) _mm512_storeu_ps(out + (i0 + mi) * kVq8Rows, yacc[mi]);
  alignas(64) uint8_t tb[64];
  _mm512_store_si512(tb, top);
  uint32_t mx = 0;
  for (uint8_t v : tb) mx = v > mx ? v : mx;
  return mx;
}

// x rows i0 .. i0 + MR - 1 of block b from its decoded panel: rows_vbmi's sums and epilogue,
// the weights loaded instead of looked up (word 8 blk + e of a row meets panel entry 8 blk + e).
template <int MR>
void rows_panel(const Problem& p, int64_t b, const uint8_t* panel, int64_t i0, float* out) {
  const int64_t words = p.nv / kVq8Group * p.dim;
  const uint32_t* xp[MR];
  __m512 yacc[MR];
  for (int mi = 0; mi < MR; ++mi) {
    xp[mi] = p.xp + (i0 + mi) * words;
    yacc[mi] = _mm512_setzero_ps();
  }
  __m512 sv = _mm512_set1_ps(1.0f);
  int64_t seg = -1;
  for (int64_t blk = 0; blk < p.nblk; ++blk) {
    __m512i acc[MR];
    for (int mi = 0; mi < MR; ++mi) acc[mi] = _mm512_setzero_si512();
    for (int64_t e = 8 * blk; e < 8 * blk + 8; ++e) {
      const __m512i w = _mm512_load_si512(panel + e * 64);
      for (int mi = 0; mi < MR; ++mi)
        acc[mi] = vnni::dpbusd_x4(acc[mi], w, reinterpret_cast<const int8_t*>(xp[mi] + e));
    }
    block_epilogue<MR>(p, b, blk, i0, acc, yacc, sv, seg);
  }
  for (int mi = 0; mi < MR; ++mi) _mm512_storeu_ps(out + (i0 + mi) * kVq8Rows, yacc[mi]);
}

// From this many rows of x a block's weights are looked up once into a panel, then read by
// groups of 8 rows: the look-ups (1-3 byte permutes per plane) no longer repeat per row pair.
// A one-register plane (kc <= 64: one permute) waits for 16 rows (bench_matmul vq8 d2 16
// entries, M = 8: 0.79-0.80 ms looked up, 0.82-0.85 through the panel; d4 256 entries,
// three permutes: 1.32 -> 0.93-0.96 ms).
template <int NT>
constexpr int64_t kPanelRows = NT == 1 ? 16 : 8;

template <int DIM, int NT>
QK_VBMI uint32_t block_dim(const Problem& p, int64_t b, const int8_t* tab, float* out) {
  __m512i t[DIM][NT];
  load_planes(tab, t);
  uint32_t top = 0, r = 0;
  int64_t i = 0;
  if (p.m >= kPanelRows<NT>) {
    thread_local AlignedVector<uint8_t> panel;
    panel.resize(static_cast<size_t>(p.nv * kVq8Rows * p.dim));
    top = p.nib ? decode_panel<DIM, NT, true>(p, b, t, panel.data())
                : decode_panel<DIM, NT, false>(p, b, t, panel.data());
    for (; i + 8 <= p.m; i += 8) rows_panel<8>(p, b, panel.data(), i, out);
    for (; i + 4 <= p.m; i += 4) rows_panel<4>(p, b, panel.data(), i, out);
    for (; i < p.m; ++i) rows_panel<1>(p, b, panel.data(), i, out);
    return top;
  }
  for (; i + 2 <= p.m; i += 2) {
    r = p.nib ? rows_vbmi<DIM, NT, 2, true>(p, b, t, i, out)
              : rows_vbmi<DIM, NT, 2, false>(p, b, t, i, out);
    top = r > top ? r : top;
  }
  if (i < p.m) {
    r = p.nib ? rows_vbmi<DIM, NT, 1, true>(p, b, t, i, out)
              : rows_vbmi<DIM, NT, 1, false>(p, b, t, i, out);
    top = r > top ? r : top;
  }
  return top;
}

template <int DIM>
QK_VBMI uint32_t block_kc(const Problem& p, int64_t b, const int8_t* tab, float* out) {
  if (p.kc <= 64) return block_dim<DIM, 1>(p, b, tab, out);
  if (p.kc <= 128) return block_dim<DIM, 2>(p, b, tab, out);
  if constexpr (DIM < 8) return block_dim<DIM, 4>(p, b, tab, out);
  return 0;  // unreachable: vq8_supported caps kc at 128 for dim 8
}

QK_VBMI uint32_t block_avx512(const Problem& p, int64_t b, const int8_t* tab, float* out) {
  if (p.dim == 2) return block_kc<2>(p, b, tab, out);
  if (p.dim == 4) return block_kc<4>(p, b, tab, out);
  return block_kc<8>(p, b, tab, out);
}

const Kernels kAvx512Kernels = {block_avx512, nullptr, nullptr};

}  // namespace

const Kernels* avx512_kernels() {
  return cpu_has_avx512_vbmi() ? &kAvx512Kernels : avx2_kernels();
}

}  // namespace vq8
}  // namespace qk
