// int4 matmul entry points: weight (un)packing, ISA dispatch and the split of the work into
// tasks of (tiles x rows) on the thread pool. No numerics here beyond the layout.
#include "cpu/gemm/w4/kernels.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "cpu/gemm/tile/driver.h"
#include "cpu/runtime/threadpool.h"

namespace qk {
namespace {

using tdrv::run_tasks;

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
             int mode, float* y, const float* zeros_f, const uint8_t* table8) {
  if (m <= 0 || n <= 0) return false;
  const w4::Kernels& kern = w4::kernels();
  const int64_t tiles = w4_padded_rows(n) / kW4Rows;
  const bool fast = mode == kW4Fast;
  const bool parallel = tdrv::worth_parallel(m * tiles * kW4Rows * k, fast);

  if (table8 && (!fast || zeros || zeros_f))
    throw std::invalid_argument("gemm_w4: a byte table (table8) needs the fast mode and no zero "
                                "points");
  w4::Problem p{x,     packed,  scales,  zeros,   bias,   y,      m, n, k,
                group, nullptr, nullptr, nullptr, zeros_f, table8};
  return tdrv::run_tile_gemm(p, kern, tiles, k / kW4Block * kW4TileBlockBytes, fast, parallel);
}

}  // namespace qk
