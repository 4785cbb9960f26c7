// The reference log-domain matmul: one output at a time, products summed in k order.
#include "cpu/logmm/kernels.h"

namespace qk {
namespace logmm {
namespace {

void rows_scalar(const Args& a, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const int32_t* xe = a.xe + m * a.K;
    const uint32_t* xs = a.xs + m * a.K;
    for (int64_t n = 0; n < a.N; ++n) {
      float acc = 0.0f;
      for (int64_t k = 0; k < a.K; ++k) {
        if (xe[k] == kZeroExp) continue;
        union {
          float v;
          uint32_t u;
        } p;
        p.v = product(a.table, xe[k] + a.we[k * a.Np + n], a.frac_bits);
        p.u ^= xs[k] ^ a.ws[k * a.Np + n];
        acc += p.v;
      }
      a.out[m * a.N + n] = acc * a.xscale[m] * a.wscale[n];
    }
  }
}

}  // namespace

const Kernels kScalarKernels = {rows_scalar};

}  // namespace logmm
}  // namespace qk
