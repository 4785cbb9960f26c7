// The driver shared by the tile-layout matmuls (gemm_w4, gemm_w23): the fast modes' activation
// quantization on the pool and the split of the work into (tiles x rows) tasks. No numerics
// beyond calling the ISA's quantize_x, whose definition is gemm_w4's (docs/numerics.md).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "cpu/runtime/aligned.h"

namespace qk {
namespace tdrv {

// Below this many multiply-adds a call runs on the calling thread: waking the pool (tens of
// microseconds here) costs more. The exact modes do about 3x the work per multiply-add.
bool worth_parallel(int64_t macs, bool fast);

// Runs fn(i) for i in [0, n), on the pool when `parallel`.
void run_tasks(int64_t n, bool parallel, const std::function<void(int64_t)>& fn);

// x (m, k) quantized per row and block of 32 by the active ISA's gemm_w4 quantize_x into
// xq / dx / xs (resized here). Returns true when a block holds NaN/Inf (d = NaN).
bool quantize_activations(const float* x, int64_t m, int64_t k, bool parallel,
                          AlignedVector<int8_t>& xq, std::vector<float>& dx,
                          std::vector<float>& xs);

// fn(t0, t1, m0, m1) over chunks of tiles x chunks of rows: rows split only when there are
// many; tiles per task leave at least 8 tasks per thread, at most 16 tiles each or as many as
// make kTaskBytes of weights when that is more (an even count: the exact GEMM kernels take
// tiles in pairs). tile_bytes: the packed weight bytes of one tile. Every output is computed
// by one task.
void for_tile_tasks(int64_t tiles, int64_t tile_bytes, int64_t m, bool fast, bool parallel,
                    const std::function<void(int64_t, int64_t, int64_t, int64_t)>& fn);

// A task's weights are one stream from memory, and a thread's next task is somewhere else: the
// first bytes of each task arrive before its prefetches do. With at most 16 tiles a task (256
// KiB of 4-bit codes at K = 4096, 128 KiB of 2-bit ones), GEMVs from memory ran 2-18 % slower
// than with tasks of up to 1 MiB, int2 the most (docs/speed.md "Sixteenth pass").
constexpr int64_t kTaskBytes = int64_t{1} << 20;

// A tile-layout matmul call: in fast mode x is quantized into p.xq / p.dx / p.xs first, then
// kern.fast (or kern.exact) runs over the tile tasks. Returns true when the fast mode meets
// NaN/Inf in x (nothing computed).
template <class Problem, class Kernels>
bool run_tile_gemm(Problem& p, const Kernels& kern, int64_t tiles, int64_t tile_bytes, bool fast,
                   bool parallel) {
  AlignedVector<int8_t> xq;  // 64-byte aligned: its rows (k a multiple of 32) never split a line
  std::vector<float> dx, xs;
  if (fast) {
    if (quantize_activations(p.x, p.m, p.k, parallel, xq, dx, xs)) return true;
    p.xq = xq.data();
    p.dx = dx.data();
    p.xs = xs.data();
  }
  if (fast && kern.fast_call && p.m >= 16) {
    kern.fast_call(p, tiles, parallel);
    return false;
  }
  auto fn = fast ? kern.fast : kern.exact;
  for_tile_tasks(tiles, tile_bytes, p.m, fast, parallel,
                 [&](int64_t t0, int64_t t1, int64_t m0, int64_t m1) { fn(p, t0, t1, m0, m1); });
  return false;
}

}  // namespace tdrv
}  // namespace qk
