// gemm_fp8 entry point: picks the ISA kernel and shares (rows of x, rows of W) tiles out over
// the thread pool. Each output element is computed by exactly one task, in an order that does
// not depend on the split, so results do not depend on the number of threads.
#include "cpu/gemm/fp8/kernels.h"

#include <algorithm>

#include "cpu/runtime/threadpool.h"

namespace qk {
namespace {

constexpr int64_t kMinParallelMacs = int64_t{1} << 18;  // below: one thread
constexpr int64_t kMBlock = 96;                          // rows of x per GEMM task

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

void gemm_fp8(const float* x, int64_t m, const uint8_t* w, const float* scales,
              const float* bias, int64_t n, int64_t k, int64_t group, int fmt, float* y) {
  if (m <= 0 || n <= 0) return;
  const fp8::Fp8Args a{x, w, scales, bias, y, m, n, k, group, fmt};
  const auto& table = fp8::kernels();
  if (table.call && table.call(a)) return;
  auto* kernel = table.gemm;
  const int threads = pool_threads();
  if (threads == 1 || m * n * k < kMinParallelMacs) {
    kernel(a, 0, m, 0, n);
    return;
  }
  // GEMV calls keep all rows of x in one task (each row of W is read once, from memory);
  // GEMMs split x into blocks that reuse each decoded tile of W.
  const bool gemv = m <= fp8::kFp8GemvRows;
  const int64_t mb = gemv ? m : kMBlock;
  const int64_t mt = ceil_div(m, mb);
  // About 8 tasks per thread (balance); rows of W in multiples of the kernels' row blocks.
  const int64_t unit = gemv ? 4 : 16;
  int64_t nb = ceil_div(n * mt, int64_t{8} * threads);
  nb = std::min<int64_t>(std::max<int64_t>(ceil_div(nb, unit) * unit, unit), gemv ? 256 : 512);
  const int64_t nt = ceil_div(n, nb);
  parallel_for(mt * nt, [&](int64_t t) {
    const int64_t i0 = (t / nt) * mb, j0 = (t % nt) * nb;
    kernel(a, i0, std::min(m, i0 + mb), j0, std::min(n, j0 + nb));
  });
}

void fp8_decode(const uint8_t* w, const float* scales, int64_t n0, int64_t n1, int64_t k,
                int64_t group, int fmt, float* out) {
  if (n1 <= n0 || k <= 0) return;
  float value[256];
  for (int c = 0; c < 256; ++c) value[c] = fp8_value(static_cast<uint8_t>(c), fmt);
  const int64_t groups = k / group;
  const int64_t rb = std::max<int64_t>(1, (int64_t{1} << 16) / k);  // ~64k weights per task
  parallel_for(ceil_div(n1 - n0, rb), [&](int64_t t) {
    for (int64_t r = n0 + t * rb; r < std::min(n1, n0 + (t + 1) * rb); ++r) {
      const uint8_t* codes = w + r * k;
      float* o = out + (r - n0) * k;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = scales[r * groups + g];
        for (int64_t c = g * group; c < (g + 1) * group; ++c) o[c] = value[codes[c]] * s;
      }
    }
  });
}

}  // namespace qk
