// gemm_vq8 (api.h) on the AMX tile unit: the amx level's call-wide path, from 16 rows of x.
// The block sums D (32 columns, exact int32) are what tdpbssd computes for 16 weight rows x 16
// x rows at once; the float epilogue runs per output in the definition's order (t = dx s, then
// acc + float(D) t, mul then add), so the outputs are the scalar kernel's bits.
//
// Operands, per block of 32 columns (tile/amx.h's 512-byte tiles):
// - weights: 16 rows r (one 16-row block of the layout), 32 signed bytes each. Byte 4e + j of
//   row r is w8[r][(4q + j) dim + d] for e = (q - q0) dim + d, the block's code groups q from
//   q0: the look-up of plane d for group q is one register of 16 dwords (rows r, bytes j), and
//   tile_amx::transpose8 turns the block's 8 such registers into the tile's rows. Decoded once
//   per batch of 4 blocks, by the AVX-512 kernel's look-ups (lookup_avx512.h decode_block).
// - activations: the same order of k is that of the activation words (kernels.h Problem:
//   word [q][d] = bytes (4q + j) dim + d, j = 0..3), so the tile's row e is word 8 blk + e of
//   the 16 x rows, one dword each; built once per call with dx by block.
// The sums come out as one register per weight row with the 16 x rows in its lanes: dx is a
// vector load, the row's segment scale a broadcast.
//
// Rows of x past the last whole 16-row tile: 8 or more take a tile padded with zero rows,
// fewer run on the AVX-512 kernel (tile/amx.h's rule, kPadAfterTiles).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu/gemm/tile/amx.h"

#include <algorithm>

#include "cpu/gemm/tile/driver.h"
#include "cpu/gemm/vq8/kernels.h"
#include "cpu/gemm/vq8/lookup_avx512.h"
#include "cpu/runtime/aligned.h"

namespace qk {
namespace vq8 {
namespace {

using tile_amx::kPanelBlock;
constexpr int64_t kBatch = 4;  // 16-row blocks decoded together (their panels stay in L2)

// The activation tiles of rows [0, mt) (zero past mt): xt[(c nblk + blk) 128 + 16 e + r] =
// word 8 blk + e of row 16 c + r; dxt[(c nblk + blk) 16 + r] its dx.
void pack_x(const Problem& p, int64_t mt, uint32_t* xt, float* dxt) {
  const int64_t words = p.nv / kVq8Group * p.dim, nblk = p.nblk;
  for (int64_t c = 0; c < (mt + 15) / 16; ++c)
    for (int64_t r = 0; r < 16; ++r) {
      const int64_t i = 16 * c + r;
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t at = (c * nblk + blk) * 128 + r;
        for (int64_t e = 0; e < 8; ++e)
          xt[at + 16 * e] = i < mt ? p.xp[i * words + 8 * blk + e] : 0;
        dxt[(c * nblk + blk) * 16 + r] = i < mt ? p.dx[i * nblk + blk] : 0.0f;
      }
    }
}

// Block b's weight tiles into panel (nblk x 512 bytes), from the AVX-512 kernel's decoded
// block (flat: 16 nv dim bytes, w + 128); returns the largest code read.
uint32_t decode_tiles(const Problem& p, int64_t b, uint8_t* flat, uint8_t* panel) {
  const uint32_t top = decode_block(p, b, flat);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t blk = 0; blk < p.nblk; ++blk) {
    __m512i v[8];
    for (int e = 0; e < 8; ++e)
      v[e] = _mm512_xor_si512(_mm512_load_si512(flat + (8 * blk + e) * 64), flip);
    tile_amx::store_weight_tile(v, panel + blk * kPanelBlock);
  }
  return top;
}

// Block b (its panel w) x the 16 x rows of tile c (a, dxc: their tiles and dx by block): acc
// as api.h defines it, rows [16 c, 16 c + rows) stored at out[i * 16 + l].
void tile_rows(const Problem& p, int64_t b, const uint8_t* w, const int8_t* a, const float* dxc,
               int64_t c, int rows, float* out) {
  const int64_t nblk = p.nblk;
  alignas(64) int32_t sums[2][4][256];
  alignas(64) float sc[16];
  __m512 acc[16];
  for (int n = 0; n < 16; ++n) acc[n] = _mm512_setzero_ps();
  int64_t seg = -1;
  int buf = 0;
  auto count = [&](int64_t b0) { return std::min<int64_t>(4, nblk - b0); };
  tile_amx::block_sums<true>(w, a, count(0), sums[0]);
  for (int64_t b0 = 0; b0 < nblk; b0 += 4, buf ^= 1) {
    const int64_t cnt = count(b0), b1 = b0 + cnt;
    if (b1 < nblk)  // the next chunk's tile work before this one's epilogue
      tile_amx::block_sums<true>(w + b1 * kPanelBlock, a + b1 * kPanelBlock, count(b1),
                                 sums[buf ^ 1]);
    for (int64_t j = 0; j < cnt; ++j) {
      const int64_t blk = b0 + j;
      const int32_t* d = sums[buf][j];
      const __m512 dx = _mm512_load_ps(dxc + 16 * blk);
      if (p.scales) {
        if (blk * p.nseg / nblk != seg) {
          seg = blk * p.nseg / nblk;
          for (int n = 0; n < 16; ++n) sc[n] = row_scale(p, b * kVq8Rows + n, blk);
        }
        for (int n = 0; n < 16; ++n) {
          const __m512 t = _mm512_mul_ps(dx, _mm512_set1_ps(sc[n]));
          const __m512 f = _mm512_cvtepi32_ps(_mm512_load_si512(d + 16 * n));
          acc[n] = _mm512_add_ps(acc[n], _mm512_mul_ps(f, t));
        }
      } else {  // t = dx * 1 = dx
        for (int n = 0; n < 16; ++n) {
          const __m512 f = _mm512_cvtepi32_ps(_mm512_load_si512(d + 16 * n));
          acc[n] = _mm512_add_ps(acc[n], _mm512_mul_ps(f, dx));
        }
      }
    }
  }
  alignas(64) float yt[16][16];  // yt[n][r]
  for (int n = 0; n < 16; ++n) _mm512_store_ps(yt[n], acc[n]);
  for (int r = 0; r < rows; ++r)
    for (int n = 0; n < 16; ++n) out[(16 * c + r) * kVq8Rows + n] = yt[n][r];
}

uint32_t call_amx(const Problem& p, bool parallel, const BlockStore& store) {
  const int64_t m = p.m, nblk = p.nblk, nb = (p.n + kVq8Rows - 1) / kVq8Rows;
  const int64_t mt = tile_amx::rows_on_tiles(m);
  const int64_t chunks = (mt + 15) / 16, tile_bytes = nblk * kPanelBlock;
  AlignedVector<uint32_t> xt(static_cast<size_t>(chunks * tile_bytes / 4));
  AlignedVector<float> dxt(static_cast<size_t>(chunks * nblk * 16));
  pack_x(p, mt, xt.data(), dxt.data());
  Problem rest = p;  // rows [mt, m) on the AVX-512 kernel
  rest.xp += mt * (p.nv / kVq8Group) * p.dim;
  rest.dx += mt * nblk;
  rest.xs += mt * nblk;
  rest.m = m - mt;
  const int64_t tasks = parallel ? std::min<int64_t>(nb, 64) : 1;
  AlignedVector<uint32_t> tops(static_cast<size_t>(tasks), 0);
  tdrv::run_tasks(tasks, parallel, [&](int64_t ti) {
    tile_amx::load_sums_config();
    thread_local AlignedVector<uint8_t> panels, flat;
    thread_local AlignedVector<float> outs;
    panels.resize(static_cast<size_t>(kBatch * tile_bytes));
    flat.resize(static_cast<size_t>(tile_bytes));
    outs.resize(static_cast<size_t>(kBatch * m * kVq8Rows));
    for (int64_t b0 = nb * ti / tasks, end = nb * (ti + 1) / tasks; b0 < end; b0 += kBatch) {
      const int64_t cnt = std::min(kBatch, end - b0);
      for (int64_t j = 0; j < cnt; ++j)
        tops[ti] = std::max(tops[ti], decode_tiles(p, b0 + j, flat.data(),
                                                   panels.data() + j * tile_bytes));
      for (int64_t c = 0; c < chunks; ++c) {
        const auto* a = reinterpret_cast<const int8_t*>(xt.data()) + c * tile_bytes;
        const int rows = static_cast<int>(std::min<int64_t>(16, mt - 16 * c));
        for (int64_t j = 0; j < cnt; ++j)
          tile_rows(p, b0 + j, panels.data() + j * tile_bytes, a, dxt.data() + c * nblk * 16, c,
                    rows, outs.data() + j * m * kVq8Rows);
      }
      for (int64_t j = 0; j < cnt; ++j) {
        float* out = outs.data() + j * m * kVq8Rows;
        if (rest.m > 0) avx512_kernels()->block(rest, b0 + j, block_tables(p, b0 + j),
                                                out + mt * kVq8Rows);
        store(b0 + j, out);
      }
    }
    _tile_release();
  });
  return *std::max_element(tops.begin(), tops.end());
}

// The tile path from 16 rows of x (fewer: the AVX-512 blocks).
bool amx_fits(const Problem& p) { return p.m >= kVq8Rows; }

}  // namespace

const Kernels* amx_kernels() {
  static const Kernels table = {avx512_kernels()->block, call_amx, amx_fits};
  return cpu_has_avx512_vbmi() ? &table : avx512_kernels();
}

}  // namespace vq8
}  // namespace qk
