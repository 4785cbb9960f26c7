// Log-domain matmul entry point: decodes the codes once (exponents and sign bits; w transposed
// and padded to 16 columns), builds the fraction table, spreads rows of out over the pool (each
// output is computed by one thread, whole: results do not depend on the thread count).
#include <cmath>
#include <vector>

#include "cpu/logmm/kernels.h"
#include "cpu/runtime/threadpool.h"

namespace qk {
namespace {

void decode(uint8_t c, int bits, int32_t* e, uint32_t* s) {
  const uint32_t sign_bit = 1u << (bits - 1);
  const int32_t idx = static_cast<int32_t>(c & (sign_bit - 1));
  const int32_t kmax = static_cast<int32_t>(sign_bit) - 1;
  *e = idx == 0 ? logmm::kZeroExp : idx - kmax;
  *s = (c & sign_bit) ? 0x80000000u : 0u;
}

}  // namespace

void logmm_f32(const uint8_t* xc, const uint8_t* wc, const float* xs, const float* ws,
               float* out, int64_t M, int64_t N, int64_t K, int bx, int bw, int frac_bits) {
  if (M <= 0 || N <= 0) return;
  const int64_t Np = (N + 15) / 16 * 16;  // the AVX-512 kernel's 16 lanes
  std::vector<int32_t> xe(M * K), we(K * Np, logmm::kZeroExp);
  std::vector<uint32_t> xsg(M * K), wsg(K * Np, 0u);
  for (int64_t i = 0; i < M * K; ++i) decode(xc[i], bx, &xe[i], &xsg[i]);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) decode(wc[n * K + k], bw, &we[k * Np + n], &wsg[k * Np + n]);
  std::vector<float> table(static_cast<size_t>(1) << frac_bits);
  for (size_t j = 0; j < table.size(); ++j)
    table[j] = static_cast<float>(std::exp2(static_cast<double>(j) / table.size()));
  logmm::Args a{xe.data(), xsg.data(), we.data(), wsg.data(), table.data(), xs, ws, out,
                N, Np, K, frac_bits};
  const auto& kern = logmm::kernels();
  int64_t per = (int64_t{1} << 16) / (N * (K > 0 ? K : 1)) + 1;
  const int64_t tasks = (M + per - 1) / per;
  auto task = [&](int64_t t) {
    const int64_t m0 = t * per, m1 = m0 + per < M ? m0 + per : M;
    kern.rows(a, m0, m1);
  };
  if (tasks == 1 || pool_threads() == 1) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
    return;
  }
  parallel_for(tasks, task);
}

}  // namespace qk
