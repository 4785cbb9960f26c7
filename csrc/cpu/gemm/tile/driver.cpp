#include "cpu/gemm/tile/driver.h"

#include <algorithm>

#include "cpu/gemm/w4/kernels.h"
#include "cpu/runtime/threadpool.h"

namespace qk {
namespace tdrv {

bool worth_parallel(int64_t macs, bool fast) {
  return pool_threads() > 1 && macs >= (fast ? int64_t{1} << 21 : int64_t{1} << 19);
}

void run_tasks(int64_t n, bool parallel, const std::function<void(int64_t)>& fn) {
  if (!parallel || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
  } else {
    parallel_for(n, fn);
  }
}

bool quantize_activations(const float* x, int64_t m, int64_t k, bool parallel,
                          AlignedVector<int8_t>& xq, std::vector<float>& dx,
                          std::vector<float>& xs) {
  const w4::Kernels& kern = w4::kernels();
  const int64_t nb = k / kW4Block;
  xq.resize(static_cast<size_t>(m * k));
  dx.resize(static_cast<size_t>(m * nb));
  xs.resize(static_cast<size_t>(m * nb));
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 14) / k);  // rows per task
  run_tasks((m + rows - 1) / rows, parallel && m > rows, [&](int64_t i) {
    kern.quantize_x(x, k, i * rows, std::min(m, (i + 1) * rows), xq.data(), dx.data(),
                     xs.data());
  });
  for (float d : dx)
    if (d != d) return true;
  return false;
}

void for_tile_tasks(int64_t tiles, int64_t tile_bytes, int64_t m, bool fast, bool parallel,
                    const std::function<void(int64_t, int64_t, int64_t, int64_t)>& fn) {
  const int threads = pool_threads();
  const int64_t row_chunk = fast ? 128 : 32;
  const int64_t mchunks = (m + row_chunk - 1) / row_chunk;
  const int64_t most = std::max<int64_t>(16, kTaskBytes / std::max<int64_t>(1, tile_bytes));
  int64_t per = most;
  if (parallel) per = std::max<int64_t>(1, std::min(most, tiles * mchunks / (8 * threads)));
  if (per > 1) per &= ~int64_t{1};
  const int64_t tchunks = (tiles + per - 1) / per;
  run_tasks(tchunks * mchunks, parallel, [&](int64_t i) {
    const int64_t tc = i / mchunks, mc = i % mchunks;
    fn(tc * per, std::min(tiles, (tc + 1) * per), mc * row_chunk,
       std::min(m, (mc + 1) * row_chunk));
  });
}

}  // namespace tdrv
}  // namespace qk
