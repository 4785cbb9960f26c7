// The loop of the tile-layout GEMMs that take tiles in pairs and K in chunks of groups: the
// AVX2 exact modes over weights decoded to k-major floats (tile/avx2.h) and the AVX-512 fast
// mode (nothing to decode: `decode` does nothing); the AVX-512 exact GEMM (tile/avx512.h) takes
// two pairs at a time in a loop of its own. ISA-neutral: the register blocks are the caller's.
// Tiles are taken in pairs (nt = 2, or 1 for a lone last tile), decoded once per chunk of groups (>= 256
// k, L1-resident) by `decode(t, nt, g0, g1, w)` (the layout of tile/avx2.h), then
// `block(m, rows, t, nt, g, w_g, ys)` runs rows [m, m + rows) (rows <= MR) over group g, its
// outputs accumulated in ys (16 floats per row, zero at the start of each pair), and
// `store(m, t, nt, ys_row)` writes each row's 16 values.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/runtime/aligned.h"

namespace qk {
namespace tile_loop {

template <int MR, typename P, typename Decode, typename Block, typename Store>
void pairs_by_groups(const P& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1,
                     Decode decode, Block block, Store store) {
  const int64_t ng = p.k / p.group, rows = m1 - m0;
  const int64_t gpc = std::max<int64_t>(1, 256 / p.group);  // groups per chunk
  // Zero-filled when grown, so the unused half of a lone tile's columns is always finite.
  thread_local AlignedVector<float> wbuf, ybuf;
  if (wbuf.size() < static_cast<size_t>(gpc * p.group * 16)) wbuf.resize(gpc * p.group * 16);
  if (ybuf.size() < static_cast<size_t>(rows * 16)) ybuf.resize(rows * 16);
  float* wp = wbuf.data();
  float* yp = ybuf.data();
  for (int64_t t = t0; t < t1; t += 2) {
    const int nt = t + 1 < t1 ? 2 : 1;
    std::fill(yp, yp + rows * 16, 0.0f);
    for (int64_t g0 = 0; g0 < ng; g0 += gpc) {
      const int64_t g1 = std::min(ng, g0 + gpc);
      decode(t, nt, g0, g1, wp);
      for (int64_t i = 0; i < rows; i += MR) {
        const int r = static_cast<int>(std::min<int64_t>(MR, rows - i));
        for (int64_t g = g0; g < g1; ++g)
          block(m0 + i, r, t, nt, g, wp + (g - g0) * p.group * 16, yp + i * 16);
      }
    }
    for (int64_t i = 0; i < rows; ++i) store(m0 + i, t, nt, yp + i * 16);
  }
}

}  // namespace tile_loop
}  // namespace qk
