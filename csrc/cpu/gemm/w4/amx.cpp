// AMX kernel of the int4 fast mode (api.h; docs/numerics.md "int4 group-wise matmul", mode 1),
// the amx level of isa.h. The definition's block sums du = sum u * xq over 32 k are exact int32
// sums, which the tile unit computes for 16 columns x 16 rows at once (tdpbusd: unsigned weight
// codes x signed activation codes, groups of 4 products added exactly); the float epilogue of
// every block (idot = fma(-zc, xs, du), acc = fma(dx, idot, acc)), of every group (y =
// fma(scale, acc, y)) and the bias run per output in the definition's order, so the outputs are
// the scalar kernel's bits (integer sums are exact in any order).
//
// Operands, per block of 32 k (512 bytes each):
// - weights, per tile pair (16 columns n): 16 rows of 32 codes in k order, decoded once per
//   call and task from packed vectors i (low nibbles: k 8i .. 8i+3 of all 16 columns, high
//   nibbles: 8i+4 .. 8i+7) by an 8 x 16 dword transpose (transpose8); the codebook mode looks
//   the codes up first (vpshufb);
// - activations, per 16 rows: 8 rows (4-k groups) of 16 dwords (one per row), the same
//   transpose of the rows' codes, once per 16 rows and task, with the rows' dx / xs by block.
// The sums then come out as one register per column with the 16 rows in its lanes: the rows'
// block parameters dx / xs are one vector load per block, the columns' offsets and scales
// broadcasts.
//
// Tile registers: 0-3 the sums of up to 4 consecutive blocks of one group, 4-5 weight tiles
// (16 x 32 bytes), 6-7 activation tiles (8 x 64 bytes). Rows that do not fill a 16-row tile run
// on the AVX-512 kernel; the exact mode and the activation quantization are the AVX-512 ones.
//
// GCC 12's unmasked AVX-512 intrinsics start from _mm512_undefined_*() and report it as
// maybe-uninitialized once inlined (a false positive: every lane is written).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/gemm/tile/avx512.h"
#include "cpu/gemm/w4/kernels.h"
#include "cpu/gemm/w4/offsets_avx512.h"
#include "cpu/runtime/aligned.h"

namespace qk {
namespace w4 {
namespace {

using tile_avx512::load_pair;
using tile_avx512::params_pair;
using tile_avx512::store_pair;

constexpr int64_t kPanelBlock = 512;  // one block of a tile pair as a weight tile: 8 x 64 bytes

// ldtilecfg's 64-byte operand, palette 1: tiles 0-3 16 x 64 bytes (int32 sums), 4-5 16 x 32
// (weight codes), 6-7 8 x 64 (activation codes).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 32, 32, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 8, 8};
};

// The 8 x 16 dword matrix v[j][d] transposed, in pairs of rows: out[4L + s] holds row
// d = 4L + s (dwords v[0..7][d], lower half) and row d + 8 (upper half), L = 0, 1, s = 0..3.
inline void transpose8(const __m512i* v, __m512i* out) {
  __m512i t[8], u[8];
  for (int h = 0; h < 2; ++h) {  // v[0..3] into u[0..3], v[4..7] into u[4..7]
    const __m512i* a = v + 4 * h;
    t[0] = _mm512_unpacklo_epi32(a[0], a[1]);
    t[1] = _mm512_unpackhi_epi32(a[0], a[1]);
    t[2] = _mm512_unpacklo_epi32(a[2], a[3]);
    t[3] = _mm512_unpackhi_epi32(a[2], a[3]);
    u[4 * h + 0] = _mm512_unpacklo_epi64(t[0], t[2]);  // lane L: v[0..3][4L]
    u[4 * h + 1] = _mm512_unpackhi_epi64(t[0], t[2]);  //         v[0..3][4L + 1]
    u[4 * h + 2] = _mm512_unpacklo_epi64(t[1], t[3]);
    u[4 * h + 3] = _mm512_unpackhi_epi64(t[1], t[3]);
  }
  const __m512i lane0 = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
  const __m512i lane1 = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  for (int s = 0; s < 4; ++s) {
    out[s] = _mm512_permutex2var_epi64(u[s], lane0, u[4 + s]);
    out[4 + s] = _mm512_permutex2var_epi64(u[s], lane1, u[4 + s]);
  }
}

// The integer code offsets zc = 8 + z (table8: 128) of the pair's 16 columns for group g, each
// in all 4 bytes of its dword, when every one is in [0, 15] (table8: always); false otherwise
// (zero points past [-8, 7], which the op accepts, or float zero points).
inline bool int_offsets(const Problem& p, int64_t t, int nt, int64_t g, __m512i& off) {
  if (p.table8) {
    off = _mm512_set1_epi8(static_cast<char>(128));
    return true;
  }
  if (p.zeros_f) return false;
  if (!p.zeros) {
    off = _mm512_set1_epi8(8);
    return true;
  }
  const int64_t ng = p.k / p.group;
  const __m256i za =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.zeros + (t * ng + g) * kW4Rows));
  const __m256i zb = _mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(p.zeros + ((t + nt - 1) * ng + g) * kW4Rows));
  const __m512i zc = _mm512_add_epi32(_mm512_inserti64x4(_mm512_zextsi256_si512(za), zb, 1),
                                      _mm512_set1_epi32(8));
  if (_mm512_cmpgt_epu32_mask(zc, _mm512_set1_epi32(15)) != 0) return false;
  off = _mm512_mullo_epi32(zc, _mm512_set1_epi32(0x01010101));
  return true;
}

// Blocks [0, nb) of tiles t, t + nt - 1 as weight tiles (16 rows = columns n of the output, 32
// bytes = the block's codes in k order): panel[b * 512 + 32 n + 4 q + j] = code of (n, 32 b +
// 4 q + j). Packed vector i's low nibbles are the 4-k groups q = 2i of the 16 columns, its high
// nibbles q = 2i + 1; kTable: the codes u = table8[c] of both. The codes are the signed u - zc
// when every group's offset zc is an integer in [0, 15] (128 with table8) and then the
// function returns true: the block sums are then sum (u - zc) xq = du - zc xs, the
// definition's idot, exactly; else the unsigned u (false).
template <bool kTable>
bool decode_panel(const Problem& p, int64_t t, int nt, uint8_t* panel) {
  const int64_t nb = p.k / kW4Block, tile_bytes = nb * kW4TileBlockBytes;
  const int64_t bpg = p.group / kW4Block;
  const uint8_t* w0 = p.packed + t * tile_bytes;
  const uint8_t* w1 = w0 + (nt - 1) * tile_bytes;
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512i tbl = _mm512_setzero_si512();  // table8 in every 128-bit lane
  if (kTable)
    tbl = _mm512_maskz_broadcast_i32x4(
        0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.table8)));
  bool is_signed = true;
  for (int64_t g = 0; g < nb / bpg && is_signed; ++g) {
    __m512i off;
    is_signed = int_offsets(p, t, nt, g, off);
  }
  __m512i off = _mm512_setzero_si512();
  for (int64_t b = 0; b < nb; ++b) {
    if (is_signed && b % bpg == 0) int_offsets(p, t, nt, b / bpg, off);
    __m512i v[8], rows[8];
    for (int i = 0; i < 4; ++i) {
      const int64_t at = b * kW4TileBlockBytes + 32 * i;
      const __m512i w = load_pair(w0 + at, w1 + at);
      v[2 * i] = _mm512_and_si512(w, mask);
      v[2 * i + 1] = _mm512_and_si512(_mm512_srli_epi16(w, 4), mask);
      if (kTable) {
        v[2 * i] = _mm512_shuffle_epi8(tbl, v[2 * i]);
        v[2 * i + 1] = _mm512_shuffle_epi8(tbl, v[2 * i + 1]);
      }
      if (is_signed) {  // u - zc in [-15, 15] (table8: [-127, 127]) as signed bytes
        v[2 * i] = _mm512_sub_epi8(v[2 * i], off);
        v[2 * i + 1] = _mm512_sub_epi8(v[2 * i + 1], off);
      }
    }
    transpose8(v, rows);
    uint8_t* dst = panel + b * kPanelBlock;
    for (int d = 0; d < 8; ++d) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 32 * d),
                         _mm512_castsi512_si256(rows[d]));
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 32 * (d + 8)),
                         _mm512_extracti64x4_epi64(rows[d], 1));
    }
  }
  return is_signed;
}

// Rows [m, m + 16) of the activations as the tile unit's second operand: per block 8 rows (4-k
// groups q) of 16 dwords (the rows m + r): a[b * 512 + 64 q + 4 r + j] = xq[m + r][32 b + 4 q +
// j]; and their block parameters by block: dxt[b * 16 + r] = dx[m + r][b], xst the same.
void pack_rows(const Problem& p, int64_t m, int8_t* a, float* dxt, float* xst) {
  const int64_t k = p.k, nb = k / kW4Block;
  const int8_t* x = p.xq + m * k;
  for (int64_t b = 0; b < nb; ++b) {
    __m512i v[8], rows[8];
    for (int r = 0; r < 8; ++r) {  // v[r]: rows r and r + 8 of the block
      const __m256i lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(x + r * k + 32 * b));
      const __m256i hi =
          _mm256_load_si256(reinterpret_cast<const __m256i*>(x + (r + 8) * k + 32 * b));
      v[r] = _mm512_inserti64x4(_mm512_zextsi256_si512(lo), hi, 1);
    }
    transpose8(v, rows);  // rows[q]: group q of rows 0..7, then of rows 8..15
    for (int q = 0; q < 8; ++q) _mm512_store_si512(a + b * kPanelBlock + 64 * q, rows[q]);
  }
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                           12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(nb)));
  for (int64_t b = 0; b < nb; ++b) {
    _mm512_store_ps(dxt + 16 * b, _mm512_i32gather_ps(idx, p.dx + m * nb + b, 4));
    _mm512_store_ps(xst + 16 * b, _mm512_i32gather_ps(idx, p.xs + m * nb + b, 4));
  }
}

// One block's sums into tile D: weight tile A (signed codes: tdpbssd, unsigned: tdpbusd) times
// activation tile B. (A macro: the tile intrinsics take their register numbers as literals.)
#define QK_W4_AMX_DOT(D, A, B, w, a)         \
  do {                                        \
    _tile_zero(D);                            \
    _tile_loadd(A, w, 32);                    \
    _tile_loadd(B, a, 64);                    \
    if (kSigned) _tile_dpbssd(D, A, B);       \
    else _tile_dpbusd(D, A, B);               \
  } while (0)

// The block sums of `cnt` (1-4) consecutive blocks, C[n][r] (w: weight tiles, a: activation
// tiles of the first block, each block 512 bytes on) into c[0 .. cnt).
template <bool kSigned>
inline void block_sums(const uint8_t* w, const int8_t* a, int64_t cnt, int32_t (*c)[256]) {
  QK_W4_AMX_DOT(0, 4, 6, w, a);
  if (cnt > 1) QK_W4_AMX_DOT(1, 5, 7, w + kPanelBlock, a + kPanelBlock);
  if (cnt > 2) QK_W4_AMX_DOT(2, 4, 6, w + 2 * kPanelBlock, a + 2 * kPanelBlock);
  if (cnt > 3) QK_W4_AMX_DOT(3, 5, 7, w + 3 * kPanelBlock, a + 3 * kPanelBlock);
  _tile_stored(0, c[0], 64);
  if (cnt > 1) _tile_stored(1, c[1], 64);
  if (cnt > 2) _tile_stored(2, c[2], 64);
  if (cnt > 3) _tile_stored(3, c[3], 64);
}

// Rows [m, m + 16) (a, dxt, xst: pack_rows) x the pair's columns (w: its panel, kSigned: of
// signed codes u - zc), every group, stored with the bias. The sums come out as one register
// per column with the 16 rows in its lanes: the rows' block parameters are vector loads, the
// columns' offsets and scales broadcasts. With signed codes the sums are idot itself; else idot
// = fma(-zc, xs, du) as the definition writes it. The blocks go in chunks of up to 4 within a
// group; chunk q + 1's tile work is issued before chunk q's float epilogue (two sets of sums in
// c), so the two overlap.
template <bool kSigned>
void rows16(const Problem& p, const int8_t* a, const float* dxt, const float* xst,
            const uint8_t* w, int64_t m, int64_t t, int nt) {
  const int64_t ng = p.k / p.group, bpg = p.group / kW4Block;
  const int64_t cpg = (bpg + 3) / 4, chunks = ng * cpg;  // chunks per group, in all
  alignas(64) int32_t c[2][4][256];
  alignas(64) float yt[16][16] = {};  // yt[n][r]
  alignas(64) float zc[16], sc[16];
  auto first = [&](int64_t q) { return q / cpg * bpg + q % cpg * 4; };
  auto count = [&](int64_t q) { return std::min<int64_t>(4, (q / cpg + 1) * bpg - first(q)); };
  block_sums<kSigned>(w, a, count(0), c[0]);
  __m512 acc[16];
  for (int64_t q = 0; q < chunks; ++q) {
    const int64_t g = q / cpg, b0 = first(q), cnt = count(q);
    if (q + 1 < chunks) {
      const int64_t b1 = first(q + 1);
      block_sums<kSigned>(w + b1 * kPanelBlock, a + b1 * kPanelBlock, count(q + 1),
                          c[(q + 1) & 1]);
    }
    if (q % cpg == 0) {
      for (int n = 0; n < 16; ++n) acc[n] = _mm512_setzero_ps();
      if (!kSigned) _mm512_store_ps(zc, code_offsets(p, t, nt, g));
    }
    for (int64_t j = 0; j < cnt; ++j) {
      const int32_t* sums = c[q & 1][j];
      const __m512 dx = _mm512_load_ps(dxt + 16 * (b0 + j));
      if (kSigned) {
        for (int n = 0; n < 16; ++n)
          acc[n] = _mm512_fmadd_ps(dx, _mm512_cvtepi32_ps(_mm512_load_si512(sums + 16 * n)),
                                   acc[n]);
      } else {
        const __m512 xs = _mm512_load_ps(xst + 16 * (b0 + j));
        for (int n = 0; n < 16; ++n) {
          const __m512 du = _mm512_cvtepi32_ps(_mm512_load_si512(sums + 16 * n));
          const __m512 idot = _mm512_fnmadd_ps(xs, _mm512_set1_ps(zc[n]), du);
          acc[n] = _mm512_fmadd_ps(dx, idot, acc[n]);
        }
      }
    }
    if (q % cpg == cpg - 1) {
      _mm512_store_ps(sc, params_pair(p.scales, ng, t, nt, g));
      for (int n = 0; n < 16; ++n)
        _mm512_store_ps(yt[n], _mm512_fmadd_ps(_mm512_set1_ps(sc[n]), acc[n],
                                               _mm512_load_ps(yt[n])));
    }
  }
  alignas(64) float ys[16][16];  // ys[r][n]
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) ys[r][n] = yt[n][r];
  for (int r = 0; r < 16; ++r) store_pair(p, m + r, t, nt, _mm512_load_ps(ys[r]));
}

// Every tile pair's panel first, then per 16-row tile its packed rows against each pair.
template <bool kTable>
void fast_impl(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  const int64_t full = m0 + (m1 - m0) / 16 * 16;  // rows the tiles take
  if (full > m0) {
    static const TileConfig config;
    _tile_loadconfig(&config);
    const int64_t nb = p.k / kW4Block, bytes = nb * kPanelBlock, pairs = (t1 - t0 + 1) / 2;
    thread_local AlignedVector<uint8_t> panels;
    thread_local AlignedVector<int8_t> rows;
    thread_local AlignedVector<float> params;
    panels.resize(static_cast<size_t>(pairs * bytes));
    rows.resize(static_cast<size_t>(bytes));
    params.resize(static_cast<size_t>(32 * nb));
    thread_local std::vector<char> is_signed;  // pair i's panel holds signed codes
    is_signed.resize(static_cast<size_t>(pairs));
    for (int64_t i = 0; i < pairs; ++i) {
      const int64_t t = t0 + 2 * i;
      is_signed[i] = decode_panel<kTable>(p, t, t1 - t >= 2 ? 2 : 1, panels.data() + i * bytes);
    }
    float* dxt = params.data();
    float* xst = dxt + 16 * nb;
    for (int64_t m = m0; m < full; m += 16) {
      pack_rows(p, m, rows.data(), dxt, xst);
      for (int64_t i = 0; i < pairs; ++i) {
        const int64_t t = t0 + 2 * i;
        const uint8_t* w = panels.data() + i * bytes;
        const int nt = t1 - t >= 2 ? 2 : 1;
        if (is_signed[i]) rows16<true>(p, rows.data(), dxt, xst, w, m, t, nt);
        else rows16<false>(p, rows.data(), dxt, xst, w, m, t, nt);
      }
    }
    _tile_release();
  }
  if (full < m1) avx512_kernels()->fast(p, t0, t1, full, m1);  // fewer than 16 rows left
}

void fast_amx(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (p.table8) fast_impl<true>(p, t0, t1, m0, m1);
  else fast_impl<false>(p, t0, t1, m0, m1);
}

}  // namespace

const Kernels* amx_kernels() {
  static const Kernels table = {avx512_kernels()->quantize_x, fast_amx, avx512_kernels()->exact};
  return &table;
}

}  // namespace w4
}  // namespace qk
