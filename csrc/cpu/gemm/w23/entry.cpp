// 2-bit / 3-bit matmul entry points: weight (un)packing, ISA dispatch and the split of the
// work into tasks of (tiles x rows) on the thread pool. No numerics here beyond the layout.
#include "cpu/gemm/w23/kernels.h"

#include <algorithm>
#include <vector>

#include "cpu/gemm/tile/driver.h"
#include "cpu/runtime/threadpool.h"

namespace qk {
namespace {

using tdrv::run_tasks;

// The B words of one row and block from its 32 codes (u, or null: padding, u = 0).
void pack_row_block(const uint8_t* u, int bits, uint32_t* w) {
  for (int i = 0; i < bits; ++i) w[i] = 0;
  if (!u) return;
  for (int c = 0; c < kW23Block; ++c) {
    const uint32_t v = u[c];
    if (bits == 2) {
      w[c / 16] |= (v & 3) << (8 * (c % 4) + 2 * ((c % 16) / 4));
    } else if (c < 24) {
      w[c / 8] |= (v & 7) << (8 * (c % 4) + 3 * ((c % 8) / 4));
    } else {
      const int i = (c - 24) / 4, j = c % 4;
      w[i] |= (v & 3) << (8 * j + 6);
      w[2] |= ((v >> 2) & 1) << (8 * j + 6 + i);
    }
  }
}

}  // namespace

void pack_w23(const uint8_t* codes, int64_t n, int64_t k, int bits, uint8_t* out) {
  const int64_t tiles = w23_padded_rows(n) / kW23Rows, nb = k / kW23Block;
  run_tasks(tiles, n * k >= (int64_t{1} << 20) && pool_threads() > 1, [&](int64_t t) {
    for (int64_t r = t * kW23Rows; r < (t + 1) * kW23Rows; ++r) {
      for (int64_t b = 0; b < nb; ++b) {
        uint32_t w[3];
        pack_row_block(r < n ? codes + r * k + b * kW23Block : nullptr, bits, w);
        for (int i = 0; i < bits; ++i)
          std::memcpy(out + w23_word_offset(bits, k, r, b, i), &w[i], 4);
      }
    }
  });
}

void unpack_w23(const uint8_t* packed, int64_t n, int64_t k, int bits, uint8_t* codes) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c)
      codes[r * k + c] = static_cast<uint8_t>(w23_code(packed, bits, k, r, c));
}

bool gemm_w23(const float* x, int64_t m, const uint8_t* packed, const float* scales,
              const int32_t* zeros, const float* bias, int64_t n, int64_t k, int64_t group,
              int bits, int qmin, int mode, float* y, const float* zeros_f) {
  if (m <= 0 || n <= 0) return false;
  const w23::Kernels& kern = w23::kernels();
  const int64_t tiles = w23_padded_rows(n) / kW23Rows;
  const bool fast = mode == kW23Fast;
  const bool parallel = tdrv::worth_parallel(m * tiles * kW23Rows * k, fast);

  w23::Problem p{x,     packed, scales, zeros, bias, y,      m,      n,     k,
                 group, bits,   static_cast<float>(-qmin), nullptr, nullptr, nullptr, zeros_f};
  // fast mode: the int4 kernel's activation quantization (the same definition)
  return tdrv::run_tile_gemm(p, kern, tiles, k / kW23Block * w23_tile_block_bytes(bits), fast,
                             parallel);
}

}  // namespace qk
