// The reference fake quantization kernels (kernels.h): core/fakequant.h one element at a time.
#include "cpu/fakequant/kernels.h"

namespace qk {
namespace fakequant {

void fwd_run_scalar(const float* x, float* y, int64_t n, const Channel& c) {
  for (int64_t i = 0; i < n; ++i) y[i] = fq_value(x[i], c.s, c.inv, c.b, c.has_b, c.lo, c.hi);
}

void bwd_run_scalar(const float* x, const float* gy, float* gx, int64_t n, const Channel& c,
                    double* ls, double* lb) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gy[i];
    const FqGrad d = fq_grad(x[i], g, c.inv, c.b, c.lo, c.hi);
    gx[i] = d.gx;
    ls[i & 7] += static_cast<double>(g) * static_cast<double>(d.s_term);
    lb[i & 7] += static_cast<double>(d.outside ? g : 0.0f) * 1.0;
  }
}

void fwd_row_scalar(const float* x, float* y, int64_t n, const Row& r) {
  for (int64_t i = 0; i < n; ++i)
    y[i] = fq_value(x[i], r.s[i], r.inv[i], r.b ? r.b[i] : 0.0f, r.b != nullptr, r.lo, r.hi);
}

void bwd_row_scalar(const float* x, const float* gy, float* gx, int64_t n, const Row& r,
                    double* as, double* ab) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gy[i];
    const FqGrad d = fq_grad(x[i], g, r.inv[i], r.b ? r.b[i] : 0.0f, r.lo, r.hi);
    gx[i] = d.gx;
    as[i] += static_cast<double>(g) * static_cast<double>(d.s_term);
    ab[i] += static_cast<double>(d.outside ? g : 0.0f) * 1.0;
  }
}

const Kernels kScalarKernels = {fwd_run_scalar, bwd_run_scalar, fwd_row_scalar, bwd_row_scalar};

}  // namespace fakequant
}  // namespace qk
