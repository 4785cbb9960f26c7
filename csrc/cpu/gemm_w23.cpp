// 2-bit / 3-bit matmul entry points: weight (un)packing, ISA dispatch and the split of the
// work into tasks of (tiles x rows) on the thread pool. No numerics here beyond the layout.
#include "cpu/gemm_w23.h"

#include <algorithm>
#include <vector>

#include "cpu/gemm_w4.h"
#include "cpu/kernels.h"
#include "cpu/threadpool.h"

namespace qk {
namespace {

// Below this many multiply-adds a call runs on the calling thread: waking the pool (tens of
// microseconds here) costs more than it saves.
constexpr int64_t kMinParallelMacs[2] = {int64_t{1} << 19, int64_t{1} << 21};

bool use_avx2() { return active_isa() == kIsaAvx2 && w23::avx2_kernels() != nullptr; }

template <typename F>
void run_tasks(int64_t n, bool parallel, F fn) {
  if (!parallel || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
  } else {
    parallel_for(n, [&](int64_t i) { fn(i); });
  }
}

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
              int bits, int qmin, int mode, float* y) {
  if (m <= 0 || n <= 0) return false;
  const bool avx2 = use_avx2();
  const w23::Kernels& kern = avx2 ? *w23::avx2_kernels() : w23::kScalarKernels;
  const int threads = pool_threads();
  const int64_t tiles = w23_padded_rows(n) / kW23Rows, nb = k / kW23Block;
  const int64_t macs = m * tiles * kW23Rows * k;
  const bool parallel = threads > 1 && macs >= kMinParallelMacs[mode == kW23Fast];

  w23::Problem p{x,     packed, scales, zeros, bias, y,      m,      n,     k,
                 group, bits,   static_cast<float>(-qmin), nullptr, nullptr, nullptr};
  std::vector<int8_t> xq;
  std::vector<float> dx, xs;
  if (mode == kW23Fast) {  // the int4 kernel's activation quantization: the same definition
    const w4::Kernels* k4 = avx2 ? w4::avx2_kernels() : &w4::kScalarKernels;
    if (!k4) k4 = &w4::kScalarKernels;
    xq.resize(static_cast<size_t>(m * k));
    dx.resize(static_cast<size_t>(m * nb));
    xs.resize(static_cast<size_t>(m * nb));
    const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 14) / k);  // rows per task
    run_tasks((m + rows - 1) / rows, parallel && m > rows, [&](int64_t i) {
      k4->quantize_x(x, k, i * rows, std::min(m, (i + 1) * rows), xq.data(), dx.data(),
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
  const int64_t row_chunk = mode == kW23Fast ? 64 : 32;
  const int64_t mchunks = (m + row_chunk - 1) / row_chunk;
  int64_t per = 16;  // even: the exact GEMM kernel takes tiles in pairs
  if (parallel) per = std::max<int64_t>(1, std::min<int64_t>(16, tiles * mchunks / (8 * threads)));
  if (per > 1) per &= ~int64_t{1};
  const int64_t tchunks = (tiles + per - 1) / per;
  auto fn = mode == kW23Fast ? kern.fast : kern.exact;
  run_tasks(tchunks * mchunks, parallel, [&](int64_t i) {
    const int64_t tc = i / mchunks, mc = i % mchunks;
    fn(p, tc * per, std::min(tiles, (tc + 1) * per), mc * row_chunk,
       std::min(m, (mc + 1) * row_chunk));
  });
  return false;
}

}  // namespace qk
