// FWHT entry point: the scale, ISA dispatch, and the rows spread over the thread pool (each
// row is transformed by one thread, whole, so results do not depend on the thread count).
#include <cmath>
#include <cstring>

#include "cpu/hadamard/kernels.h"
#include "cpu/runtime/threadpool.h"

namespace qk {
namespace {

// Rows per task: at least this many floats, so that waking the pool pays.
constexpr int64_t kMinTaskFloats = int64_t{1} << 15;

}  // namespace

void fwht_f32(const float* x, float* y, int64_t rows, int64_t n) {
  if (rows <= 0 || !fwht_size_ok(n)) return;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  const auto& k = hadamard::kernels();
  int64_t per = kMinTaskFloats / n;
  per = per < 1 ? 1 : per;
  const int64_t tasks = (rows + per - 1) / per;
  auto task = [&](int64_t t) {
    const int64_t r0 = t * per, r1 = r0 + per < rows ? r0 + per : rows;
    if (x != y) std::memcpy(y + r0 * n, x + r0 * n, sizeof(float) * (r1 - r0) * n);
    k.rows(y + r0 * n, r1 - r0, n, scale);
  };
  if (tasks == 1 || pool_threads() == 1) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
    return;
  }
  parallel_for(tasks, task);
}

}  // namespace qk
