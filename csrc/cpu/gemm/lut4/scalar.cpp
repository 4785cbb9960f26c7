// Scalar reference kernel of gemm_lut4: decode each weight as table[c] * s, accumulate
// x * w in k order (float32, no FMA: the build uses -ffp-contract=off).
#include "cpu/gemm/lut4/kernels.h"

namespace qk {
namespace lut4 {
namespace {

void gemm_scalar(const Lut4Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t k = a.k, groups = a.k / a.group, row_bytes = a.k / 2;
  for (int64_t i = m0; i < m1; ++i) {
    const float* xr = a.x + i * k;
    for (int64_t j = n0; j < n1; ++j) {
      const uint8_t* p = a.packed + j * row_bytes;
      const float* s = a.scales + (j - a.scale_row0) * groups;
      float acc = 0.0f;
      for (int64_t e = 0; e < k; ++e) {
        const uint8_t b = p[e >> 1];
        const int c = (e & 1) ? (b >> 4) : (b & 15);
        const float w = a.table16[c] * s[e / a.group];
        acc += xr[e] * w;
      }
      a.y[i * a.n + j] = a.bias ? acc + a.bias[j] : acc;
    }
  }
}

}  // namespace

const Kernels kScalarKernels = {gemm_scalar};

}  // namespace lut4
}  // namespace qk
