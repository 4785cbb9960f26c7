// gemm_lut4 entry point: picks the ISA kernel and shares (row-of-x block, row-of-W block)
// tiles out over the thread pool. Each output element is computed by exactly one task, in the
// same order whatever the thread count, so results do not depend on the number of threads.
#include "cpu/gemm_lut4.h"

#include <algorithm>

#include "cpu/kernels.h"
#include "cpu/threadpool.h"

namespace qk {
namespace {

constexpr int64_t kMinParallelMacs = int64_t{1} << 18;  // below: one thread
constexpr int64_t kMBlock = 64;                          // rows of x per GEMM task

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

namespace {

void run(const impl::Lut4Args& a) {
  const int64_t m = a.m, n = a.n, k = a.k;
  if (m <= 0 || n <= 0) return;
  auto* kernel = active_isa() == kIsaAvx2 ? impl::gemm_lut4_avx2 : impl::gemm_lut4_scalar;
  const int threads = pool_threads();
  if (threads == 1 || m * n * k < kMinParallelMacs) {
    kernel(a, 0, m, 0, n);
    return;
  }
  // GEMV-like calls (the kernel's on-the-fly path) keep all rows of x in one task; GEMMs
  // split x into blocks that reuse each decoded tile of W.
  const int64_t mb = m <= 2 ? m : kMBlock;
  const int64_t mt = ceil_div(m, mb);
  // About 8 tasks per thread (balance), rows of W in multiples of 4 (the decoded tile).
  int64_t nb = ceil_div(n * mt, int64_t{8} * threads);
  nb = std::min<int64_t>(std::max<int64_t>(ceil_div(nb, 4) * 4, 4), 256);
  const int64_t nt = ceil_div(n, nb);
  parallel_for(mt * nt, [&](int64_t t) {
    const int64_t i0 = (t / nt) * mb, j0 = (t % nt) * nb;
    kernel(a, i0, std::min(m, i0 + mb), j0, std::min(n, j0 + nb));
  });
}

}  // namespace

void gemm_lut4(const float* x, int64_t m, const uint8_t* packed, const float* scales,
               const float* table16, const float* bias, int64_t n, int64_t k, int64_t group,
               float* y) {
  run(impl::Lut4Args{x, packed, scales, table16, bias, y, m, n, k, group});
}

void gemm_lut4_dq(const float* x, int64_t m, const uint8_t* packed, const int8_t* qscales,
                  const float* scale2, float mean, int64_t dq_group, const float* table16,
                  const float* bias, int64_t n, int64_t k, int64_t group, float* y) {
  impl::Lut4Args a{x, packed, nullptr, table16, bias, y, m, n, k, group};
  a.qscales = qscales;
  a.scale2 = scale2;
  a.mean = mean;
  a.dq_group = dq_group;
  run(a);
}

}  // namespace qk
