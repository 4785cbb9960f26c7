// The reference FWHT (api.h): radix-2 stages in order, then the scale.
#include "cpu/hadamard/kernels.h"

namespace qk {
namespace hadamard {

void row_scalar(float* v, int64_t n, float scale) {
  for (int64_t h = 1; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
  for (int64_t j = 0; j < n; ++j) v[j] *= scale;
}

namespace {

void rows_scalar(float* x, int64_t rows, int64_t n, float scale) {
  for (int64_t r = 0; r < rows; ++r) row_scalar(x + r * n, n, scale);
}

}  // namespace

const Kernels kScalarKernels = {rows_scalar};

}  // namespace hadamard
}  // namespace qk
