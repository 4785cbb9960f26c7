// The split of an int8-weight matmul's output into (row range x column-block range) tiles run
// on the thread pool (entry.cpp, and the amx level's float-activation kernel, f32_amx.cpp).
// Results do not depend on the thread count: every output element is computed by one tile, whole.
#pragma once
#include <cstdint>

#include "cpu/gemm/w8/api.h"
#include "cpu/runtime/threadpool.h"

namespace qk {
namespace w8 {

// Below this many multiply-adds a call runs on one thread: waking the pool costs more.
inline constexpr int64_t kMinParallelMacs = int64_t{1} << 18;

// Tiles of `mc` rows x `nbc` column blocks; body(m0, m1, b0, b1). Tiles sharing a column
// range are consecutive so a thread's weights stay cached while it walks the rows.
template <typename F>
inline void run_tiles(int64_t m, int64_t n, int64_t k, int64_t mc, F body) {
  const int64_t nb = w8_padded_n(n) / kW8BlockN;
  const int threads = pool_threads();
  mc = mc < m ? mc : m;
  const int64_t mt = (m + mc - 1) / mc;
  // About 4 tiles per thread at least (the pool balances them dynamically), at most 8 blocks.
  int64_t nbc = nb * mt / (4 * threads);
  nbc = nbc < 1 ? 1 : (nbc > 8 ? 8 : nbc);
  const int64_t nt = (nb + nbc - 1) / nbc;
  auto tile = [&](int64_t c) {
    const int64_t mi = c % mt, ni = c / mt;
    const int64_t m0 = mi * mc, m1 = m0 + mc < m ? m0 + mc : m;
    const int64_t b0 = ni * nbc, b1 = b0 + nbc < nb ? b0 + nbc : nb;
    body(m0, m1, b0, b1);
  };
  if (threads == 1 || mt * nt == 1 || m * n * k < kMinParallelMacs) {
    for (int64_t c = 0; c < mt * nt; ++c) tile(c);
  } else {
    parallel_for(mt * nt, tile);
  }
}

}  // namespace w8
}  // namespace qk
