// int4 matmul entry points: weight (un)packing, ISA dispatch and the split of the work into
// tasks of (tiles x rows) on the thread pool. No numerics here beyond the layout.
#include "cpu/gemm_w4.h"

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/threadpool.h"

namespace qk {
namespace {

// Below this many multiply-adds a call runs on the calling thread: waking the pool (tens of
// microseconds here) costs more. The exact mode does about 3x the work per multiply-add.
constexpr int64_t kMinParallelMacs[2] = {int64_t{1} << 19, int64_t{1} << 21};

const w4::Kernels& kernels() {
  if (active_isa() == kIsaAvx2) {
    const w4::Kernels* k = w4::avx2_kernels();
    if (k) return *k;
  }
  return w4::kScalarKernels;
}

// Runs fn(i) for i in [0, n), on the pool when `parallel`.
template <typename F>
void run_tasks(int64_t n, bool parallel, F fn) {
  if (!parallel || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
  } else {
    parallel_for(n, [&](int64_t i) { fn(i); });
  }
}

}  // namespace

void pack_w4(const int8_t* codes, int64_t n, int64_t k, uint8_t* out) {
  const int64_t tiles = w4_padded_rows(n) / kW4Rows, nb = k / kW4Block;
  run_tasks(tiles, n * k >= (int64_t{1} << 20) && pool_threads() > 1, [&](int64_t t) {
    for (int64_t r = t * kW4Rows; r < (t + 1) * kW4Rows; ++r) {
      for (int64_t b = 0; b < nb; ++b) {
        for (int64_t i = 0; i < 4; ++i) {
          uint8_t* dst = out + w4_word_offset(k, r, b, i);
          const int8_t* src = r < n ? codes + r * k + b * kW4Block + 8 * i : nullptr;
          for (int j = 0; j < 4; ++j) {
            int lo = src ? src[j] + 8 : 8, hi = src ? src[j + 4] + 8 : 8;  // padding: code 0
            dst[j] = static_cast<uint8_t>((lo & 15) | (hi & 15) << 4);
          }
        }
      }
    }
  });
}

void unpack_w4(const uint8_t* packed, int64_t n, int64_t k, int8_t* codes) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c)
      codes[r * k + c] = static_cast<int8_t>(w4_nibble(packed, k, r, c) - 8);
}

bool gemm_w4(const float* x, int64_t m, const uint8_t* packed, const float* scales,
             const int32_t* zeros, const float* bias, int64_t n, int64_t k, int64_t group,
             int mode, float* y) {
  if (m <= 0 || n <= 0) return false;
  const w4::Kernels& kern = kernels();
  const int threads = pool_threads();
  const int64_t tiles = w4_padded_rows(n) / kW4Rows, nb = k / kW4Block;
  const int64_t macs = m * tiles * kW4Rows * k;
  const bool parallel = threads > 1 && macs >= kMinParallelMacs[mode == kW4Fast];

  w4::Problem p{x, packed, scales, zeros, bias, y, m, n, k, group, nullptr, nullptr, nullptr};
  std::vector<int8_t> xq;
  std::vector<float> dx, xs;
  if (mode == kW4Fast) {
    xq.resize(static_cast<size_t>(m * k));
    dx.resize(static_cast<size_t>(m * nb));
    xs.resize(static_cast<size_t>(m * nb));
    const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 14) / k);  // rows per task
    run_tasks((m + rows - 1) / rows, parallel && m > rows, [&](int64_t i) {
      kern.quantize_x(x, k, i * rows, std::min(m, (i + 1) * rows), xq.data(), dx.data(),
                      xs.data());
    });
    // quantize_x marks a block holding NaN/Inf with d = NaN: int8 codes cannot represent it
    for (float d : dx)
      if (d != d) return true;
    p.xq = xq.data();
    p.dx = dx.data();
    p.xs = xs.data();
  }

  // Tasks: chunks of tiles x chunks of rows. Rows are split only when there are many; tiles
  // per task leave at least 8 tasks per thread for load balance, at most 16 tiles each.
  const int64_t row_chunk = mode == kW4Fast ? 64 : 32;
  const int64_t mchunks = (m + row_chunk - 1) / row_chunk;
  int64_t per = 16;  // even: the exact GEMM kernel takes tiles in pairs
  if (parallel) per = std::max<int64_t>(1, std::min<int64_t>(16, tiles * mchunks / (8 * threads)));
  if (per > 1) per &= ~int64_t{1};
  const int64_t tchunks = (tiles + per - 1) / per;
  auto fn = mode == kW4Fast ? kern.fast : kern.exact;
  run_tasks(tchunks * mchunks, parallel, [&](int64_t i) {
    const int64_t tc = i / mchunks, mc = i % mchunks;
    fn(p, tc * per, std::min(tiles, (tc + 1) * per), mc * row_chunk,
       std::min(m, (mc + 1) * row_chunk));
  });
  return false;
}

}  // namespace qk
