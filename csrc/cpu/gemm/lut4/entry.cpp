// gemm_lut4 entry point: picks the ISA kernel and shares (row-of-x block, row-of-W block)
// tiles out over the thread pool. Each output element is computed by exactly one task, in the
// same order whatever the thread count, so results do not depend on the number of threads.
#include "cpu/gemm/lut4/kernels.h"

#include <algorithm>
#include <vector>

#include "cpu/runtime/threadpool.h"

namespace qk {
namespace {

constexpr int64_t kMinParallelMacs = int64_t{1} << 18;  // below: one thread
constexpr int64_t kMBlock = 64;                          // rows of x per GEMM task
constexpr int64_t kDqChunkBlocks = 2048;  // double-quantized scales rebuilt at a time (8 KiB)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

namespace {

using Kernel = void (*)(const lut4::Lut4Args&, int64_t, int64_t, int64_t, int64_t);

// Double-quantized scales of blocks [b0, b1), rebuilt into out (the compiler vectorizes the
// inner loop: one second-level scale per run of dq_group blocks).
void rebuild_scales(const int8_t* q, const float* scale2, float mean, int64_t dq_group,
                    int64_t b0, int64_t b1, float* out) {
  for (int64_t b = b0; b < b1;) {
    const int64_t h = b / dq_group, end = std::min(b1, (h + 1) * dq_group);
    const float s2 = scale2[h];
    for (int64_t i = b; i < end; ++i) out[i - b0] = lut4::lut4_dq_scale(q[i], s2, mean);
    b = end;
  }
}

// One task: the kernel over rows [n0, n1) of W, through chunks of rebuilt scales when they
// are double-quantized. Chunks are whole multiples of the kernels' 4-row tiles and pairs, and
// every output is computed the same way whatever its neighbours, so the chunking changes no bit.
void run_task(Kernel kernel, const lut4::Lut4Args& a, int64_t m0, int64_t m1, int64_t n0,
              int64_t n1) {
  if (a.scales) {
    kernel(a, m0, m1, n0, n1);
    return;
  }
  const int64_t groups = a.k / a.group;
  const int64_t rows = std::max<int64_t>(4, kDqChunkBlocks / groups / 4 * 4);
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(rows * groups));
  for (int64_t j0 = n0; j0 < n1; j0 += rows) {
    const int64_t j1 = std::min(n1, j0 + rows);
    rebuild_scales(a.qscales, a.scale2, a.mean, a.dq_group, j0 * groups, j1 * groups,
                   buf.data());
    lut4::Lut4Args c = a;
    c.scales = buf.data();
    c.scale_row0 = j0;
    kernel(c, m0, m1, j0, j1);
  }
}

void run(const lut4::Lut4Args& a) {
  const int64_t m = a.m, n = a.n, k = a.k;
  if (m <= 0 || n <= 0) return;
  Kernel kernel = lut4::kernels().gemm;
  const int threads = pool_threads();
  if (threads == 1 || m * n * k < kMinParallelMacs) {
    run_task(kernel, a, 0, m, 0, n);
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
    run_task(kernel, a, i0, std::min(m, i0 + mb), j0, std::min(n, j0 + nb));
  });
}

}  // namespace

void gemm_lut4(const float* x, int64_t m, const uint8_t* packed, const float* scales,
               const float* table16, const float* bias, int64_t n, int64_t k, int64_t group,
               float* y) {
  run(lut4::Lut4Args{x, packed, scales, table16, bias, y, m, n, k, group});
}

void gemm_lut4_dq(const float* x, int64_t m, const uint8_t* packed, const int8_t* qscales,
                  const float* scale2, float mean, int64_t dq_group, const float* table16,
                  const float* bias, int64_t n, int64_t k, int64_t group, float* y) {
  lut4::Lut4Args a{x, packed, nullptr, table16, bias, y, m, n, k, group};
  a.qscales = qscales;
  a.scale2 = scale2;
  a.mean = mean;
  a.dq_group = dq_group;
  run(a);
}

void lut4_decode(const uint8_t* packed, const float* scales, const int8_t* qscales,
                 const float* scale2, float mean, int64_t dq_group, const float* table16,
                 int64_t n0, int64_t n1, int64_t k, int64_t group, float* w) {
  if (n1 <= n0 || k <= 0) return;
  const int64_t groups = k / group, rows = n1 - n0;
  const int64_t rb = std::max<int64_t>(1, (int64_t{1} << 16) / k);  // ~64k weights per task
  parallel_for(ceil_div(rows, rb), [&](int64_t t) {
    thread_local std::vector<float> rebuilt;
    rebuilt.resize(static_cast<size_t>(groups));
    for (int64_t r = n0 + t * rb; r < std::min(n1, n0 + (t + 1) * rb); ++r) {
      const float* s = scales ? scales + r * groups : rebuilt.data();
      if (!scales)
        rebuild_scales(qscales, scale2, mean, dq_group, r * groups, (r + 1) * groups,
                       rebuilt.data());
      const uint8_t* row = packed + r * (k / 2);
      float* out = w + (r - n0) * k;
      for (int64_t g = 0; g < groups; ++g) {
        float ts[16];  // the group's 16 weights: table16[c] * s, the same product per weight
        for (int c = 0; c < 16; ++c) ts[c] = table16[c] * s[g];
        const uint8_t* bytes = row + g * group / 2;
        float* o = out + g * group;
        for (int64_t i = 0; i < group / 2; ++i) {
          o[2 * i] = ts[bytes[i] & 15];
          o[2 * i + 1] = ts[bytes[i] >> 4];
        }
      }
    }
  });
}

}  // namespace qk
