// Scalar reference kernel of gemm_fp8, the definition: w = fp8_value(code) * s per weight
// (float32), products accumulated in k order (float32, no FMA: the build uses
// -ffp-contract=off), then the bias added.
#include "cpu/gemm/fp8/kernels.h"

namespace qk {
namespace fp8 {
namespace {

void gemm_scalar(const Fp8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t k = a.k, groups = a.k / a.group;
  float table[256];
  for (int c = 0; c < 256; ++c) table[c] = fp8_value(static_cast<uint8_t>(c), a.fmt);
  for (int64_t i = m0; i < m1; ++i) {
    const float* xr = a.x + i * k;
    for (int64_t j = n0; j < n1; ++j) {
      const uint8_t* wr = a.w + j * k;
      const float* s = a.scales + j * groups;
      float acc = 0.0f;
      for (int64_t e = 0; e < k; ++e) {
        const float w = table[wr[e]] * s[e / a.group];
        acc += xr[e] * w;
      }
      a.y[i * a.n + j] = a.bias ? acc + a.bias[j] : acc;
    }
  }
}

}  // namespace

const Kernels kScalarKernels = {gemm_scalar, nullptr};

}  // namespace fp8
}  // namespace qk
