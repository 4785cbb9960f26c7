// AMX kernel of the int8 x int8 product (layout in api.h), the amx level of isa.h: the tile unit
// multiplies a 16-row x 64-k tile of activation codes by a 16-step x 16-column tile of weights
// (tdpbssd: signed x signed bytes, groups of 4 products added to int32 sums, wrapping like
// vpdpbusd). The packed weight layout is already the tile unit's: one block's 16 consecutive
// 4-k steps are 16 rows of 64 bytes (16 columns x 4 k), 1 KiB at stride 64. So the weights are
// read in place; the activation rows too (stride k), for every whole 64-k chunk.
//
// The int32 sums are the exact sums (mod 2^32, as on every path), so the outputs are bit-identical
// to the scalar kernel's; the epilogue is the AVX-512 one (epilogue_avx512.h), without the
// AVX-512 kernel's bias correction (tdpbssd takes signed codes as they are).
//
// Tile registers: 0-3 the sums of a 32-row x 32-column micro-tile (2 x 2 tiles of 16 x 16), 4-5
// two 16-row activation tiles, 6-7 two weight blocks. Per 64-k chunk: 4 tile loads (4 KiB) and
// 4 tdpbssd (4 x 16 x 16 x 64 multiply-adds). The k tail (k not a multiple of 64) goes through
// zero-padded copies of its activation bytes and weight steps; rows that do not fill a 16-row
// tile (a decode step's one row, a prefill's last rows) run on the AVX-512 kernel.
#include <immintrin.h>

#include <cstring>

#include "cpu/gemm/w8/epilogue_avx512.h"
#include "cpu/gemm/w8/kernels.h"
#include "cpu/runtime/amx_tiles.h"

namespace qk {
namespace w8 {
namespace {

// Where a micro-tile reads: R activation tiles (rows a, a + 16 lda), NB weight blocks (w, w +
// ws), `chunks` whole 64-k chunks in place, then (if at) one zero-padded tail chunk: at holds R
// x 16 rows of 64 bytes, wt NB x 1 KiB.
struct Panel {
  const int8_t* a;
  int64_t lda;
  const int8_t* w;
  int64_t ws;
  int64_t chunks;
  const int8_t* at;
  const int8_t* wt;
};

template <int R, int NB>
__attribute__((always_inline)) inline void chunk(const int8_t* a, int64_t lda, const int8_t* w,
                                                 int64_t ws) {
  _tile_loadd(4, a, lda);
  _tile_loadd(6, w, 64);
  if (NB > 1) _tile_loadd(7, w + ws, 64);
  _tile_dpbssd(0, 4, 6);
  if (NB > 1) _tile_dpbssd(1, 4, 7);
  if (R > 1) {
    _tile_loadd(5, a + 16 * lda, lda);
    _tile_dpbssd(2, 5, 6);
    if (NB > 1) _tile_dpbssd(3, 5, 7);
  }
}

// The R x NB tiles of sums into c[r * 2 + j] (16 x 16 int32 each, rows of 64 bytes).
template <int R, int NB>
void micro(const Panel& p, int32_t (*c)[256]) {
  _tile_zero(0);
  if (NB > 1) _tile_zero(1);
  if (R > 1) _tile_zero(2);
  if (R > 1 && NB > 1) _tile_zero(3);
  for (int64_t s = 0; s < p.chunks; ++s) chunk<R, NB>(p.a + 64 * s, p.lda, p.w + 1024 * s, p.ws);
  if (p.at) chunk<R, NB>(p.at, 64, p.wt, 1024);
  _tile_stored(0, c[0], 64);
  if (NB > 1) _tile_stored(1, c[1], 64);
  if (R > 1) _tile_stored(2, c[2], 64);
  if (R > 1 && NB > 1) _tile_stored(3, c[3], 64);
}

void s8s8_amx(const int8_t* xq, int64_t m0, int64_t m1, const int8_t* packed, int64_t k,
              int64_t b0, int64_t b1, const W8Out& out) {
  const int64_t kp = w8_padded_k(k), ws = kW8BlockN * kp;
  const int64_t chunks = k / 64, tail = k - 64 * chunks;  // tail: activation bytes past chunks
  const int64_t steps_left = kp / 4 - 16 * chunks;        // weight 4-k steps past chunks
  const int64_t full = m0 + (m1 - m0) / 16 * 16;          // rows the tiles take
  if (full > m0) {
    static const AmxTileConfig config({16, 16, 16, 16, 16, 16, 16, 16},  // every tile 16 x 64
                                      {64, 64, 64, 64, 64, 64, 64, 64});
    _tile_loadconfig(&config);
    alignas(64) int8_t at[2 * 16 * 64], wt[2 * 1024];
    alignas(64) int32_t c[4][256];
    for (int64_t b = b0; b < b1; b += 2) {
      const int nb = b1 - b >= 2 ? 2 : 1;
      if (tail) {
        std::memset(wt, 0, sizeof(wt));
        for (int j = 0; j < nb; ++j)
          std::memcpy(wt + 1024 * j, packed + (b + j) * ws + 1024 * chunks, 64 * steps_left);
      }
      for (int64_t i = m0; i < full; i += 32) {
        const int r = full - i >= 32 ? 2 : 1;
        if (tail) {
          std::memset(at, 0, sizeof(at));
          for (int t = 0; t < 16 * r; ++t)
            std::memcpy(at + 64 * t, xq + (i + t) * k + 64 * chunks, tail);
        }
        const Panel p{xq + i * k, k, packed + b * ws, ws, chunks, tail ? at : nullptr, wt};
        if (r == 2) nb == 2 ? micro<2, 2>(p, c) : micro<2, 1>(p, c);
        else nb == 2 ? micro<1, 2>(p, c) : micro<1, 1>(p, c);
        for (int rr = 0; rr < r; ++rr)
          for (int j = 0; j < nb; ++j)
            for (int t = 0; t < 16; ++t)
              store_s8(_mm512_load_si512(c[rr * 2 + j] + 16 * t), 0, i + 16 * rr + t,
                       (b + j) * kW8BlockN, out);
      }
    }
    _tile_release();
  }
  if (full < m1) {  // fewer than 16 rows: the AVX-512 kernel, with the row sums it takes
    int32_t sums[16];
    const int8_t* x = xq + full * k;  // rows [full, m1) as rows [0, m1 - full)
    xsums_avx512(x, m1 - full, k, sums);
    W8Out rest = out;
    rest.sx = out.sx ? out.sx + full : nullptr;
    rest.y = out.y ? out.y + full * out.n : nullptr;
    rest.acc = out.acc ? out.acc + full * out.n : nullptr;
    rest.xsum = sums;
    s8s8_avx512(x, 0, m1 - full, packed, k, b0, b1, rest);
  }
}

// The float-activation product (W8A16): f32_amx.cpp from 16 rows up, else the AVX-512 kernel.
// No per-call row sums (xsums): the tiles take signed codes as they are, and the few rows left
// to the AVX-512 kernel get theirs above.
const Kernels kAmxKernels = {s8s8_amx, f32_avx512, nullptr, f32_call_amx};
}  // namespace

const Kernels* amx_kernels() { return &kAmxKernels; }

}  // namespace w8
}  // namespace qk
