// Fake quantization entry points: the per-channel inverses, ISA dispatch, the fixed split of
// the work into tasks over the thread pool, and the backward's per-channel sums combined in a
// fixed order (api.h), so results do not depend on the thread count.
#include <algorithm>
#include <functional>
#include <vector>

#include "cpu/fakequant/kernels.h"
#include "cpu/runtime/threadpool.h"

namespace qk {
namespace {

using fakequant::Channel;
using fakequant::Row;

// Elements per task, at least: so that waking the pool pays.
constexpr int64_t kMinTaskFloats = int64_t{1} << 15;
// Along the last axis each task holds 2 x C double sums: at most this many tasks.
constexpr int64_t kMaxRowTasks = 64;

void run_tasks(int64_t tasks, const std::function<void(int64_t)>& fn) {
  if (tasks == 1 || pool_threads() == 1) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
    return;
  }
  parallel_for(tasks, fn);
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The shared setup: 1 / scale per channel (one float32 division, as torch's reciprocal) and
// the clip range.
struct Setup {
  std::vector<float> inv;
  float lo, hi;
  Setup(const float* scale, int64_t channels, int32_t q_n, int32_t q_p)
      : inv(static_cast<size_t>(channels)), lo(fq_lo(q_n)), hi(static_cast<float>(q_p)) {
    for (int64_t c = 0; c < channels; ++c) inv[c] = 1.0f / scale[c];
  }
  Channel channel(const float* scale, const float* offset, int64_t c) const {
    return {scale[c], inv[c], offset ? offset[c] : 0.0f, offset != nullptr, lo, hi};
  }
};

// Channels along the last axis: each element its own channel, rows of C elements.
bool along_last(int64_t channels, int64_t inner) { return inner == 1 && channels > 1; }

// Otherwise runs of one channel: segment g = (o, c) of `inner` elements, cut into `chunks`
// pieces of at most kFqChunk; `per` pieces per task.
struct Runs {
  int64_t chunks, pieces, per;
  Runs(int64_t outer, int64_t channels, int64_t inner)
      : chunks(cdiv(inner, kFqChunk)), pieces(outer * channels * chunks),
        per(std::max<int64_t>(1, kMinTaskFloats / std::min(inner, kFqChunk))) {}
  int64_t tasks() const { return cdiv(pieces, per); }
};

// Rows of C per task along the last axis (fixed by the shape).
int64_t rows_per_task(int64_t outer, int64_t channels) {
  return std::max(cdiv(kMinTaskFloats, channels), cdiv(outer, kMaxRowTasks));
}

double lanes_sum(const double* l) {
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

}  // namespace

void fake_quantize_f32(const float* x, const float* scale, const float* offset, int64_t outer,
                       int64_t channels, int64_t inner, int32_t q_n, int32_t q_p, float* y) {
  if (outer <= 0 || channels <= 0 || inner <= 0) return;
  const Setup st(scale, channels, q_n, q_p);
  const auto& k = fakequant::kernels();
  if (along_last(channels, inner)) {
    const Row r{scale, st.inv.data(), offset, st.lo, st.hi};
    const int64_t per = rows_per_task(outer, channels);
    run_tasks(cdiv(outer, per), [&](int64_t t) {
      for (int64_t o = t * per; o < std::min(outer, (t + 1) * per); ++o)
        k.fwd_row(x + o * channels, y + o * channels, channels, r);
    });
    return;
  }
  const Runs runs(outer, channels, inner);
  run_tasks(runs.tasks(), [&](int64_t t) {
    for (int64_t p = t * runs.per; p < std::min(runs.pieces, (t + 1) * runs.per); ++p) {
      const int64_t seg = p / runs.chunks, j = (p % runs.chunks) * kFqChunk;
      const int64_t at = seg * inner + j;
      k.fwd_run(x + at, y + at, std::min(kFqChunk, inner - j),
                st.channel(scale, offset, seg % channels));
    }
  });
}

void fake_quantize_backward_f32(const float* x, const float* grad_y, const float* scale,
                                const float* offset, int64_t outer, int64_t channels,
                                int64_t inner, int32_t q_n, int32_t q_p, double grad_factor,
                                float* grad_x, float* grad_scale, float* grad_offset) {
  if (channels <= 0) return;
  std::vector<double> sum_s(static_cast<size_t>(channels)), sum_b(static_cast<size_t>(channels));
  const Setup st(scale, channels, q_n, q_p);
  const auto& k = fakequant::kernels();
  if (outer <= 0 || inner <= 0) {
    // nothing to sum: zero gradients
  } else if (along_last(channels, inner)) {
    const Row r{scale, st.inv.data(), offset, st.lo, st.hi};
    const int64_t per = rows_per_task(outer, channels), tasks = cdiv(outer, per);
    std::vector<double> part(static_cast<size_t>(tasks * 2 * channels));  // zeros
    run_tasks(tasks, [&](int64_t t) {
      double* as = part.data() + t * 2 * channels;
      for (int64_t o = t * per; o < std::min(outer, (t + 1) * per); ++o)
        k.bwd_row(x + o * channels, grad_y + o * channels, grad_x + o * channels, channels, r, as,
                  as + channels);
    });
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t c = 0; c < channels; ++c) {
        sum_s[c] += part[(t * 2) * channels + c];
        sum_b[c] += part[(t * 2 + 1) * channels + c];
      }
  } else {
    const Runs runs(outer, channels, inner);
    std::vector<double> ps(static_cast<size_t>(runs.pieces)), pb(static_cast<size_t>(runs.pieces));
    run_tasks(runs.tasks(), [&](int64_t t) {
      for (int64_t p = t * runs.per; p < std::min(runs.pieces, (t + 1) * runs.per); ++p) {
        const int64_t seg = p / runs.chunks, j = (p % runs.chunks) * kFqChunk;
        const int64_t at = seg * inner + j;
        double ls[8] = {0, 0, 0, 0, 0, 0, 0, 0}, lb[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        k.bwd_run(x + at, grad_y + at, grad_x + at, std::min(kFqChunk, inner - j),
                  st.channel(scale, offset, seg % channels), ls, lb);
        ps[p] = lanes_sum(ls);
        pb[p] = lanes_sum(lb);
      }
    });
    for (int64_t p = 0; p < runs.pieces; ++p) {
      const int64_t c = (p / runs.chunks) % channels;
      sum_s[c] += ps[p];
      sum_b[c] += pb[p];
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    grad_scale[c] = static_cast<float>(grad_factor * sum_s[c]);
    if (grad_offset) grad_offset[c] = static_cast<float>(grad_factor * sum_b[c]);
  }
}

}  // namespace qk
