// The fast mode of the tile-layout matmuls (gemm_w4 with its codebook mode, gemm_w23) on the
// AMX tile unit: the amx level of cpu/runtime/isa.h. Include only from the families' amx.cpp
// files (compiled for the avx512 set + AMX-TILE / AMX-INT8).
//
// The definition (tile/ref.h `fast`): per row m, column n and block b of 32 k, the exact sum
// I = sum (u - zc) xq = du - zc xs; acc = fma(dx, I, acc) over a group's blocks; y = fma(scale,
// acc, y) over the groups; then + bias. The tile unit computes the block sums for 16 columns x
// 16 rows at once (tdpbssd / tdpbusd, groups of 4 byte products added exactly), and the float
// epilogue runs per output in the definition's order, so the outputs are the scalar kernel's
// bits (integer sums are exact in any order).
//
// Operands, per block (512 bytes each):
// - weights, per tile pair (16 columns): 16 rows of the block's 32 codes in k order, decoded
//   once per task (fast_call: once per call) from the format's 4-code groups (one register
//   per group q, lane n = codes 4q .. 4q+3 of column n) by an 8 x 16 dword transpose. Where
//   every group's offset zc of the pair is an integer in [0, 15] (a codebook's: 128) the panel
//   holds the signed codes u - zc
//   (then tdpbssd gives I itself: one conversion and one FMA per block and output); else u
//   (tdpbusd, then fma(-zc, xs, du) as the definition writes it: float zero points, or integer
//   zero points outside the packers' range, which the ops accept).
// - activations, per 16 rows: 8 rows (4-k groups) of 16 dwords (one per row), the same
//   transpose of the rows' int8 codes, once per 16 rows and task (fast_call: per call), with
//   the rows' dx / xs by block.
// The sums come out as one register per column with the 16 rows in its lanes: the rows' block
// parameters are vector loads, the columns' offsets and scales broadcasts.
//
// Tile registers: 0-3 the sums of up to 4 consecutive blocks of one group, 4-5 weight tiles
// (16 x 32 bytes), 6-7 activation tiles (8 x 64 bytes). The next chunk's tile work is issued
// before a chunk's epilogue (two sets of sums in memory). Measured on a Sapphire Rapids class
// VM (docs/speed.md), per block of 16 x 16 outputs: the tile work with its stores ~10 ns, the
// epilogue (16 conversions and FMAs) ~10 ns, the two together ~21 ns: they barely overlap, and
// bf16 tiles (tdpbf16ps, whose sums need no conversion) traded the conversions for slower tile
// work at the same total.
//
// A format F provides, for its Problem p (fields as tile/ref.h reads them):
//   void decode(int64_t t, int nt, int64_t b, __m512i (&v)[8]) const: block b of tiles t,
//     t + nt - 1 as unsigned bytes, v[q] lane n = codes 4q .. 4q+3 of column n;
//   bool int_offsets(int64_t t, int nt, int64_t g, __m512i& off) const: the integer offsets
//     zc of the pair's columns for group g in every byte of lane n, when u - zc fits a signed
//     byte for every code u (int4 / int2 / int3: zc in [0, 15]; a codebook: 128), or false;
//   __m512 offsets(int64_t t, int nt, int64_t g) const: the float offsets zc;
//   void rest(int64_t t0, int64_t t1, int64_t m0, int64_t m1) const: the AVX-512 kernel, for
//     the few rows left after the 16-row tiles (kPadAfterTiles, kPadAlone below).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/gemm/tile/avx512.h"
#include "cpu/gemm/tile/driver.h"
#include "cpu/runtime/aligned.h"
#include "cpu/runtime/amx_tiles.h"

namespace qk {
namespace tile_amx {

constexpr int64_t kBlock = 32;        // codes per block along k
constexpr int64_t kPanelBlock = 512;  // one block of 16 columns or rows as a tile

// The 8 x 16 dword matrix v[j][d] transposed, in pairs of rows: out[4L + s] holds row
// d = 4L + s (dwords v[0..7][d], lower half) and row d + 8 (upper half), L = 0, 1, s = 0..3.
inline void transpose8(const __m512i* v, __m512i* out) {
  __m512i t[4], u[8];
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

// One block's weight tile (16 rows of 32 bytes, 64-byte aligned) from its 8 registers of 4-code
// groups, v[q] lane n = bytes 4q .. 4q+3 of row n: transposed, row n = v[0..7][n].
inline void store_weight_tile(const __m512i (&v)[8], uint8_t* dst) {
  __m512i rows[8];
  transpose8(v, rows);
  for (int d = 0; d < 8; ++d) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 32 * d), _mm512_castsi512_si256(rows[d]));
    _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 32 * (d + 8)),
                       _mm512_extracti64x4_epi64(rows[d], 1));
  }
}

// zc = zc0 + z of tiles t, t + nt - 1 for group g (z = 0 without zero points) in every byte of
// its lane, when all 16 are in [0, 15]; else false.
inline bool int_offsets_pair(const int32_t* zeros, int zc0, int64_t ng, int64_t t, int nt,
                             int64_t g, __m512i& off) {
  __m512i zc = _mm512_set1_epi32(zc0);
  if (zeros) {
    const auto* z8 = reinterpret_cast<const uint8_t*>(zeros);
    constexpr int64_t kRows = tile_avx512::kRows;
    zc = _mm512_add_epi32(zc, tile_avx512::load_pair(z8 + 4 * (t * ng + g) * kRows,
                                                     z8 + 4 * ((t + nt - 1) * ng + g) * kRows));
  }
  if (_mm512_cmpgt_epu32_mask(zc, _mm512_set1_epi32(15)) != 0) return false;
  off = _mm512_mullo_epi32(zc, _mm512_set1_epi32(0x01010101));
  return true;
}

// Blocks [0, nb) of tiles t, t + nt - 1 as weight tiles (16 rows = columns n, 32 bytes = the
// block's codes in k order): panel[b * 512 + 32 n + 4 q + j] = code 4q + j of column n. Signed
// codes u - zc (returns true) where every group's integer offset allows, else u (false).
template <class F>
bool decode_panel(const F& f, int64_t t, int nt, uint8_t* panel) {
  const int64_t nb = f.p.k / kBlock, bpg = f.p.group / kBlock;
  __m512i off = _mm512_setzero_si512();
  bool is_signed = true;
  for (int64_t g = 0; g < nb / bpg && is_signed; ++g) is_signed = f.int_offsets(t, nt, g, off);
  for (int64_t b = 0; b < nb; ++b) {
    if (is_signed && b % bpg == 0) f.int_offsets(t, nt, b / bpg, off);
    __m512i v[8];
    f.decode(t, nt, b, v);
    if (is_signed)  // u - zc in [-15, 15] (a codebook's: [-127, 127]) as signed bytes
      for (int q = 0; q < 8; ++q) v[q] = _mm512_sub_epi8(v[q], off);
    store_weight_tile(v, panel + b * kPanelBlock);
  }
  return is_signed;
}

// Rows [m, m + rows) (rows <= 16) of the activation codes as activation tiles, rows past
// `rows` zero: a[b * 512 + 64 q + 4 r + j] = xq[m + r][32 b + 4 q + j]; their block parameters
// by block: dxt[b * 16 + r] = dx[m + r][b], xst the same (0 past `rows`).
template <class P>
void pack_rows(const P& p, int64_t m, int rows, int8_t* a, float* dxt, float* xst) {
  const int64_t k = p.k, nb = k / kBlock;
  const int8_t* x = p.xq + m * k;
  auto row = [&](int r, int64_t b) {  // 32-byte aligned (the driver's codes, k % 32 == 0)
    return r < rows ? _mm256_load_si256(reinterpret_cast<const __m256i*>(x + r * k + 32 * b))
                    : _mm256_setzero_si256();
  };
  for (int64_t b = 0; b < nb; ++b) {
    __m512i v[8], out[8];
    for (int r = 0; r < 8; ++r)  // v[r]: rows r and r + 8 of the block
      v[r] = _mm512_inserti64x4(_mm512_zextsi256_si512(row(r, b)), row(r + 8, b), 1);
    transpose8(v, out);  // out[q]: group q of rows 0..7, then of rows 8..15
    for (int q = 0; q < 8; ++q) _mm512_store_si512(a + b * kPanelBlock + 64 * q, out[q]);
  }
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(nb)));
  const __mmask16 valid = static_cast<__mmask16>((1u << rows) - 1);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    _mm512_store_ps(dxt + 16 * b,
                    _mm512_mask_i32gather_ps(zero, valid, idx, p.dx + m * nb + b, 4));
    _mm512_store_ps(xst + 16 * b,
                    _mm512_mask_i32gather_ps(zero, valid, idx, p.xs + m * nb + b, 4));
  }
}

// The tile configuration of block_sums: tiles 0-3 16 x 64 bytes (int32 sums), 4-5 16 x 32
// (weight codes), 6-7 8 x 64 (activation codes). Loaded by each task that runs them.
inline void load_sums_config() {
  static const AmxTileConfig config({16, 16, 16, 16, 16, 16, 8, 8},
                                    {64, 64, 64, 64, 32, 32, 64, 64});
  _tile_loadconfig(&config);
}

// One block's sums into tile D: weight tile A (signed codes: tdpbssd, unsigned: tdpbusd) times
// activation tile B. (A macro: the tile intrinsics take their register numbers as literals.)
#define QK_TILE_AMX_DOT(D, A, B, w, a) \
  do {                                 \
    _tile_zero(D);                     \
    _tile_loadd(A, w, 32);             \
    _tile_loadd(B, a, 64);             \
    if (kSigned) _tile_dpbssd(D, A, B); \
    else _tile_dpbusd(D, A, B);        \
  } while (0)

// The block sums of `cnt` (1-4) consecutive blocks, C[n][r] (w: weight tiles, a: activation
// tiles of the first block, each block 512 bytes on) into c[0 .. cnt).
template <bool kSigned>
inline void block_sums(const uint8_t* w, const int8_t* a, int64_t cnt, int32_t (*c)[256]) {
  QK_TILE_AMX_DOT(0, 4, 6, w, a);
  if (cnt > 1) QK_TILE_AMX_DOT(1, 5, 7, w + kPanelBlock, a + kPanelBlock);
  if (cnt > 2) QK_TILE_AMX_DOT(2, 4, 6, w + 2 * kPanelBlock, a + 2 * kPanelBlock);
  if (cnt > 3) QK_TILE_AMX_DOT(3, 5, 7, w + 3 * kPanelBlock, a + 3 * kPanelBlock);
  _tile_stored(0, c[0], 64);
  if (cnt > 1) _tile_stored(1, c[1], 64);
  if (cnt > 2) _tile_stored(2, c[2], 64);
  if (cnt > 3) _tile_stored(3, c[3], 64);
}
#undef QK_TILE_AMX_DOT

// Rows [m, m + 16) (a, dxt, xst: pack_rows) x the pair's columns (w: its panel, kSigned: of
// signed codes), every group; the first `rows` stored, with the bias.
template <bool kSigned, class F>
void rows16(const F& f, const int8_t* a, const float* dxt, const float* xst, const uint8_t* w,
            int64_t m, int rows, int64_t t, int nt) {
  const auto& p = f.p;
  const int64_t ng = p.k / p.group, bpg = p.group / kBlock, nb = p.k / kBlock;
  alignas(64) int32_t c[2][4][256];
  alignas(64) float yt[16][16] = {};  // yt[n][r]
  alignas(64) float zc[16], sc[16];
  // Chunks of up to 4 blocks inside each group, in order: the one at b0 has cnt blocks.
  auto count = [&](int64_t b0) { return std::min<int64_t>(4, (b0 / bpg + 1) * bpg - b0); };
  block_sums<kSigned>(w, a, count(0), c[0]);
  __m512 acc[16];
  int buf = 0;
  for (int64_t g = 0; g < ng; ++g) {
    for (int n = 0; n < 16; ++n) acc[n] = _mm512_setzero_ps();
    if (!kSigned) _mm512_store_ps(zc, f.offsets(t, nt, g));
    for (int64_t b0 = g * bpg; b0 < (g + 1) * bpg; b0 += 4, buf ^= 1) {
      const int64_t cnt = count(b0), b1 = b0 + cnt;
      if (b1 < nb)  // the next chunk's tile work before this one's epilogue
        block_sums<kSigned>(w + b1 * kPanelBlock, a + b1 * kPanelBlock, count(b1), c[buf ^ 1]);
      for (int64_t j = 0; j < cnt; ++j) {
        const int32_t* sums = c[buf][j];
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
    }
    _mm512_store_ps(sc, tile_avx512::params_pair(p.scales, ng, t, nt, g));
    for (int n = 0; n < 16; ++n)
      _mm512_store_ps(yt[n], _mm512_fmadd_ps(_mm512_set1_ps(sc[n]), acc[n],
                                             _mm512_load_ps(yt[n])));
  }
  alignas(64) float ys[16][16];  // ys[r][n]
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) ys[r][n] = yt[n][r];
  for (int r = 0; r < rows; ++r)
    tile_avx512::store_pair(p, m + r, t, nt, _mm512_load_ps(ys[r]));
}

// Rows left after the whole 16-row tiles that still take a tile of their own (zero rows
// padding it): from 8 after whole tiles, from 12 in a task without one; fewer run on
// the AVX-512 kernel (int4 fast 4096x4096 on 2 threads, ms, AVX-512 / AMX: M = 16 1.19 / 0.82,
// M = 24 with its 8 rows on AVX-512 1.35, M = 32 1.20; the AVX-512 kernel's rows ~0.07 each).
constexpr int kPadAfterTiles = 8, kPadAlone = 12;

// A call of m >= 16 rows: the rows on the tile unit, [0, rows_on_tiles(m)), the rest on the
// AVX-512 kernel (kPadAfterTiles).
inline int64_t rows_on_tiles(int64_t m) {
  return m % 16 >= kPadAfterTiles ? m : m - m % 16;
}

// Tiles [t0, t1) x rows [m0, m1): every tile pair's panel first, then per 16-row tile its
// packed rows against each pair; the rows short of a tile padded or through f.rest.
template <class F>
void fast(const F& f, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  const auto& p = f.p;
  const int64_t whole = m0 + (m1 - m0) / 16 * 16;  // rows in whole tiles
  const int left = static_cast<int>(m1 - whole);
  const bool pad = left >= (whole > m0 ? kPadAfterTiles : kPadAlone);
  const int64_t end = pad ? m1 : whole;  // rows on the tile unit
  if (end > m0) {
    load_sums_config();
    const int64_t nb = p.k / kBlock, bytes = nb * kPanelBlock, pairs = (t1 - t0 + 1) / 2;
    thread_local AlignedVector<uint8_t> panels;
    thread_local AlignedVector<int8_t> rows;
    thread_local AlignedVector<float> params;
    thread_local AlignedVector<char> is_signed;  // pair i's panel holds signed codes
    panels.resize(static_cast<size_t>(pairs * bytes));
    rows.resize(static_cast<size_t>(bytes));
    params.resize(static_cast<size_t>(32 * nb));
    is_signed.resize(static_cast<size_t>(pairs));
    for (int64_t i = 0; i < pairs; ++i) {
      const int64_t t = t0 + 2 * i;
      is_signed[i] = decode_panel(f, t, t1 - t >= 2 ? 2 : 1, panels.data() + i * bytes);
    }
    float* dxt = params.data();
    float* xst = dxt + 16 * nb;
    for (int64_t m = m0; m < end; m += 16) {
      const int valid = static_cast<int>(std::min<int64_t>(16, end - m));
      pack_rows(p, m, valid, rows.data(), dxt, xst);
      for (int64_t i = 0; i < pairs; ++i) {
        const int64_t t = t0 + 2 * i;
        const uint8_t* w = panels.data() + i * bytes;
        const int nt = t1 - t >= 2 ? 2 : 1;
        if (is_signed[i]) rows16<true>(f, rows.data(), dxt, xst, w, m, valid, t, nt);
        else rows16<false>(f, rows.data(), dxt, xst, w, m, valid, t, nt);
      }
    }
    _tile_release();
  }
  if (end < m1) f.rest(t0, t1, end, m1);
}

// Tile pairs a task of fast_call decodes together (4 x 16 columns: their panels, 64 KiB per
// pair and 4096 k, stay in L2 while every row tile passes).
constexpr int64_t kCallPairs = 8;

// A whole call of at least 16 rows: every 16-row tile of x packed once (tiles in parallel),
// then tasks over the tile pairs only, all rows each: a task decodes kCallPairs pairs' panels
// at a time and runs every row tile against them (rows outer, pairs inner), then f.rest for
// the rows short of a tile (fast()'s rule). The weights are decoded once per call, the rows
// packed once, where fast()'s (tiles x 128 rows) tasks did both once per task.
template <class F>
void fast_call(const F& f, int64_t tiles, bool parallel) {
  const auto& p = f.p;
  const int64_t m = p.m, end = rows_on_tiles(m);
  const int64_t chunks = (end + 15) / 16, nb = p.k / kBlock, bytes = nb * kPanelBlock;
  AlignedVector<int8_t> xt(static_cast<size_t>(chunks * bytes));
  AlignedVector<float> params(static_cast<size_t>(chunks * 32 * nb));  // per tile: dxt, xst
  tdrv::run_tasks(chunks, parallel, [&](int64_t c) {
    float* dxt = params.data() + c * 32 * nb;
    pack_rows(p, 16 * c, static_cast<int>(std::min<int64_t>(16, end - 16 * c)),
              xt.data() + c * bytes, dxt, dxt + 16 * nb);
  });
  const int64_t pairs = (tiles + 1) / 2;
  const int64_t tasks = parallel ? std::min<int64_t>(pairs, 64) : 1;
  tdrv::run_tasks(tasks, parallel, [&](int64_t ti) {
    load_sums_config();
    thread_local AlignedVector<uint8_t> panels;
    panels.resize(static_cast<size_t>(kCallPairs * bytes));
    bool is_signed[kCallPairs];
    const int64_t q0 = pairs * ti / tasks, q1 = pairs * (ti + 1) / tasks;
    for (int64_t b0 = q0; b0 < q1; b0 += kCallPairs) {
      const int64_t cnt = std::min(kCallPairs, q1 - b0);
      auto width = [&](int64_t i) { return tiles - 2 * (b0 + i) >= 2 ? 2 : 1; };
      for (int64_t i = 0; i < cnt; ++i)
        is_signed[i] = decode_panel(f, 2 * (b0 + i), width(i), panels.data() + i * bytes);
      for (int64_t c = 0; c < chunks; ++c) {
        const int rows = static_cast<int>(std::min<int64_t>(16, end - 16 * c));
        const int8_t* a = xt.data() + c * bytes;
        const float* dxt = params.data() + c * 32 * nb;
        for (int64_t i = 0; i < cnt; ++i) {
          const uint8_t* w = panels.data() + i * bytes;
          const int64_t t = 2 * (b0 + i);
          if (is_signed[i]) rows16<true>(f, a, dxt, dxt + 16 * nb, w, 16 * c, rows, t, width(i));
          else rows16<false>(f, a, dxt, dxt + 16 * nb, w, 16 * c, rows, t, width(i));
        }
      }
    }
    _tile_release();
    if (end < m && q1 > q0) f.rest(2 * q0, std::min(tiles, 2 * q1), end, m);
  });
}

}  // namespace tile_amx
}  // namespace qk
