// Public entry points of the elementwise kernels (api.h): pick the ISA's table, split the
// work into ranges and run them on the pool.
#include <atomic>
#include <cmath>
#include <vector>

#include "cpu/quant/kernels.h"
#include "cpu/runtime/threadpool.h"

namespace qk {
namespace {

// Below this many elements a call runs on one thread: waking the pool costs more.
constexpr int64_t kMinParallel = 1 << 15;
constexpr int64_t kChunk = 1 << 14;  // elements per task at least, and their multiple
constexpr int64_t kMaxTask = 1 << 21;  // elements per task at most (8 MiB of float32)

// Elements per task: about four tasks per thread, so each thread streams long contiguous
// runs (a cold 4096 x 4096 quantize ran ~15 % faster with 2M-element tasks than with 16K:
// every task's first lines arrive unprefetched) while a slow thread still hands work over.
inline int64_t task_elems(int64_t n) {
  const int64_t want = n / (4 * static_cast<int64_t>(pool_threads()));
  const int64_t t = want < kChunk ? kChunk : (want > kMaxTask ? kMaxTask : want);
  return t / kChunk * kChunk;
}

// Outputs of calls over at least 4M elements (16 MiB of float32 read or written) are written
// with streaming stores: they cannot stay cached beside the float side.
inline bool stream_output(int64_t n) { return n >= (int64_t{1} << 22); }

// Runs body(e0, e1) over [0, n) in chunks; returns the OR of the results. last_first: the
// chunks from the end of [0, n) back (each still forward inside), for a pass that follows one
// over the same input: the end of it, read last, is what the last-level cache still holds.
template <typename F>
bool for_ranges(int64_t n, F body, bool last_first = false) {
  const bool one = n < kMinParallel || pool_threads() == 1;
  if (one && !last_first) return body(int64_t{0}, n);
  const int64_t task = task_elems(n);
  const int64_t chunks = (n + task - 1) / task;
  std::atomic<bool> bad{false};
  auto run = [&](int64_t c) {
    if (last_first) c = chunks - 1 - c;
    int64_t e0 = c * task, e1 = e0 + task < n ? e0 + task : n;
    if (body(e0, e1)) bad.store(true, std::memory_order_relaxed);
  };
  if (one) {
    for (int64_t c = 0; c < chunks; ++c) run(c);
  } else {
    parallel_for(chunks, run);
  }
  return bad.load();
}

// Runs body(g0, g1) over groups when there are enough of them to share out; returns false
// when the caller should instead parallelize inside each (large) group.
template <typename F>
bool for_group_blocks(int64_t n, int64_t group, F body, bool* bad_out) {
  int64_t ng = n / group;
  int threads = pool_threads();
  if (n >= kMinParallel && threads > 1 && ng < 4 * threads) return false;
  const int64_t task = task_elems(n);
  int64_t per = task / group > 0 ? task / group : 1;
  int64_t blocks = (ng + per - 1) / per;
  std::atomic<bool> bad{false};
  auto run = [&](int64_t b) {
    int64_t g0 = b * per, g1 = g0 + per < ng ? g0 + per : ng;
    if (body(g0, g1)) bad.store(true, std::memory_order_relaxed);
  };
  if (n < kMinParallel || threads == 1) {
    for (int64_t b = 0; b < blocks; ++b) run(b);
  } else {
    parallel_for(blocks, run);
  }
  *bad_out = bad.load();
  return true;
}

// Statistics of one group, computed in parallel when it is large.
Stats stats_of(const float* x, int64_t n, bool want_sum_abs, bool parallel) {
  Stats s{INFINITY, -INFINITY, 0.0f, 0.0, false};
  const auto& p = quant::kernels();
  if (!parallel || n < kMinParallel) {
    p.minmax(x, n, &s.lo, &s.hi, &s.bad);
  } else {
    const int64_t task = task_elems(n);
    const int64_t chunks = (n + task - 1) / task;
    std::vector<float> lo(chunks), hi(chunks);
    std::vector<char> bad(chunks);
    parallel_for(chunks, [&](int64_t c) {
      int64_t e0 = c * task, len = e0 + task < n ? task : n - e0;
      bool b;
      p.minmax(x + e0, len, &lo[c], &hi[c], &b);
      bad[c] = b;
    });
    for (int64_t c = 0; c < chunks; ++c) {
      s.lo = lo[c] < s.lo ? lo[c] : s.lo;
      s.hi = hi[c] > s.hi ? hi[c] : s.hi;
      s.bad |= bad[c] != 0;
    }
  }
  s.amax = quant::amax_of(s.lo, s.hi);
  if (want_sum_abs) s.sum_abs = quant::sum_abs(x, n);
  return s;
}

}  // namespace

void group_stats(const float* x, int64_t n, int64_t group, bool want_sum_abs, Stats* out) {
  int64_t ng = n / group;
  bool parallel_inside = ng < 4 * pool_threads();
  auto one = [&](int64_t g) { out[g] = stats_of(x + g * group, group, want_sum_abs, parallel_inside); };
  if (parallel_inside || n < kMinParallel) {
    for (int64_t g = 0; g < ng; ++g) one(g);
  } else {
    parallel_for(ng, one);
  }
}

static bool affine_ranges(const float* x, int64_t n, int64_t group, const float* scale,
                          const int32_t* zp, const AffineSpec& spec, uint8_t* codes,
                          bool last_first) {
  const auto& p = quant::kernels();
  return for_ranges(n, [&](int64_t e0, int64_t e1) {
    return p.affine(x, e0, e1, group, scale, zp, spec, codes, stream_output(n));
  }, last_first);
}

bool quantize_affine(const float* x, int64_t n, int64_t group, const float* scale,
                     const int32_t* zp, const AffineSpec& spec, uint8_t* codes) {
  return affine_ranges(x, n, group, scale, zp, spec, codes, false);
}

// Parameters of few, large groups: each group's statistics are computed in parallel, then
// the whole tensor is coded by the range-parallel kernel (the callers: last chunk first).
// Returns whether NaN/Inf was seen.
static bool big_group_params(const float* x, int64_t n, int64_t group, const AffineSpec& spec,
                             const quant::ScaleSpec& ss, float* scale_out, int32_t* zp_out) {
  bool bad = false;
  for (int64_t g = 0; g < n / group; ++g) {
    Stats s = stats_of(x + g * group, group, ss.rule == kScaleMeanAbs, true);
    int32_t z;
    affine_params_from_stats(s.lo, s.hi, s.amax, s.sum_abs, group, ss.rule, ss.qpos, ss.emax,
                             spec, &scale_out[g], &z);
    if (zp_out) zp_out[g] = z;
    bad |= s.bad;
  }
  return bad;
}

bool quantize_affine_dynamic(const float* x, int64_t n, int64_t group, const AffineSpec& spec,
                             int rule, float qpos, int emax, float* scale_out, int32_t* zp_out,
                             uint8_t* codes) {
  if (n == 0) return false;
  const auto& p = quant::kernels();
  const quant::ScaleSpec ss{rule, qpos, emax};
  bool bad = false;
  if (for_group_blocks(n, group, [&](int64_t g0, int64_t g1) {
        return p.affine_groups(x, g0, g1, group, spec, ss, scale_out, zp_out, codes,
                               stream_output(n));
      }, &bad))
    return bad;
  bad = big_group_params(x, n, group, spec, ss, scale_out, zp_out);
  return affine_ranges(x, n, group, scale_out, zp_out, spec, codes, true) || bad;
}

void dequantize_affine(const uint8_t* codes, int64_t n, int64_t group, const float* scale,
                       const int32_t* zp, bool is_signed, float offset, float* out) {
  const auto& p = quant::kernels();
  for_ranges(n, [&](int64_t e0, int64_t e1) {
    p.dequant_affine(codes, e0, e1, group, scale, zp, is_signed, offset, out, stream_output(n));
    return false;
  });
}

static bool codebook_ranges(const float* x, int64_t n, int64_t group, const float* scale,
                            const CodebookSpec& spec, uint8_t* codes, bool last_first) {
  const auto& p = quant::kernels();
  return for_ranges(n, [&](int64_t e0, int64_t e1) {
    return p.codebook(x, e0, e1, group, scale, spec, codes);
  }, last_first);
}

bool quantize_codebook(const float* x, int64_t n, int64_t group, const float* scale,
                       const CodebookSpec& spec, uint8_t* codes) {
  return codebook_ranges(x, n, group, scale, spec, codes, false);
}

bool quantize_codebook_dynamic(const float* x, int64_t n, int64_t group,
                               const CodebookSpec& spec, int rule, float max_value, int emax,
                               float* scale_out, uint8_t* codes) {
  if (n == 0) return false;
  const auto& p = quant::kernels();
  const quant::ScaleSpec ss{rule, max_value, emax};
  bool bad = false;
  if (for_group_blocks(n, group, [&](int64_t g0, int64_t g1) {
        return p.codebook_groups(x, g0, g1, group, spec, ss, scale_out, codes);
      }, &bad))
    return bad;
  const AffineSpec none{0, 0, 0, 0, 0.0f, 0};
  bad = big_group_params(x, n, group, none, ss, scale_out, nullptr);
  return codebook_ranges(x, n, group, scale_out, spec, codes, true) || bad;
}

void dequantize_lut(const uint8_t* codes, int64_t n, int64_t group, const float* scale,
                    const float* lut, float* out) {
  const auto& p = quant::kernels();
  for_ranges(n, [&](int64_t e0, int64_t e1) {
    p.lut(codes, e0, e1, group, scale, lut, out, stream_output(n));
    return false;
  });
}

}  // namespace qk
