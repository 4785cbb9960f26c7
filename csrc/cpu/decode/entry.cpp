// Decode-step entry points: ISA dispatch, and the pool for work large enough to pay for waking
// it (a 337M model's decode step is far below that: one thread, no wake-up).
#include <cstring>
#include <vector>

#include "cpu/decode/kernels.h"
#include "cpu/runtime/threadpool.h"

namespace qk {
namespace {

// Work (elements for norm / SiLU, multiply-adds for attention) below which a call stays on the
// calling thread: ~50-100 us of it, several pool wake-ups. A 337M model's decode step (16
// heads of 128, tens to hundreds of positions; rows of 2048 and 5632) stays below.
constexpr int64_t kParallelWork = int64_t{1} << 20;
constexpr int64_t kTaskWork = int64_t{1} << 16;  // SiLU elements per task

template <class Fn>
void run_tasks(int64_t tasks, int64_t work_per_task, const Fn& fn) {
  if (tasks <= 1 || pool_threads() == 1 || tasks * work_per_task < kParallelWork) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
    return;
  }
  parallel_for(tasks, fn);
}

}  // namespace

void rms_norm_f32(const float* x, const float* res, const float* w, int64_t rows, int64_t n,
                  float eps, float* sum, float* out) {
  if (rows <= 0 || n <= 0) return;
  const auto& k = decode::kernels();
  run_tasks(rows, n, [&](int64_t r) {
    k.norm_row(x + r * n, res ? res + r * n : nullptr, w, n, eps, sum ? sum + r * n : nullptr,
               out + r * n);
  });
}

void silu_mul_f32(const float* g, const float* u, int64_t n, float* out) {
  if (n <= 0) return;
  const auto& k = decode::kernels();
  const int64_t tasks = (n + kTaskWork - 1) / kTaskWork;
  run_tasks(tasks, kTaskWork, [&](int64_t t) {
    const int64_t i0 = t * kTaskWork, len = n - i0 < kTaskWork ? n - i0 : kTaskWork;
    k.silu_mul(g + i0, u + i0, len, out + i0);
  });
}

void attention_step_f32(const AttentionStep& a, const float* q, const float* k, const float* v,
                        const float* cos, const float* sin, float* k_cache, float* v_cache,
                        float* y) {
  if (a.batch <= 0 || a.heads <= 0) return;
  const auto& kern = decode::kernels();
  const int64_t d = a.head_dim, len = a.pos + 1, rep = a.heads / a.kv_heads;
  for (int64_t b = 0; b < a.batch; ++b)
    for (int64_t g = 0; g < a.kv_heads; ++g) {
      const int64_t row = ((b * a.kv_heads + g) * a.max_len + a.pos) * d;
      kern.rope(k + (b * a.kv_heads + g) * d, cos, sin, d, k_cache + row);
      std::memcpy(v_cache + row, v + (b * a.kv_heads + g) * d, sizeof(float) * d);
    }
  // one task per (sequence, KV head): its rep query heads read the cached rows once
  run_tasks(a.batch * a.kv_heads, 2 * len * d * rep, [&](int64_t t) {
    const int64_t cache = t * a.max_len * d, first = t * rep * d;  // t = b * kv_heads + g
    thread_local std::vector<float> scratch;
    const size_t need = static_cast<size_t>(rep * (d + len));
    if (scratch.size() < need) scratch.resize(need);
    float* qr = scratch.data();
    for (int64_t r = 0; r < rep; ++r) kern.rope(q + first + r * d, cos, sin, d, qr + r * d);
    kern.attend(qr, rep, k_cache + cache, v_cache + cache, len, d, a.scale, qr + rep * d,
                y + first);
  });
}

}  // namespace qk
