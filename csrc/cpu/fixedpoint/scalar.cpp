// The reference requantization kernels (api.h): requant_one per element.
#include "cpu/fixedpoint/kernels.h"

namespace qk {
namespace fixedpoint {
namespace {

void s8_scalar(const int32_t* acc, int64_t rows, int64_t channels, int64_t c0, int64_t c1,
               const Requant& q, int8_t* out) {
  rows_scalar(acc, rows, channels, c0, c1, q, out);
}

void s32_scalar(const int32_t* acc, int64_t rows, int64_t channels, int64_t c0, int64_t c1,
                const Requant& q, int32_t* out) {
  rows_scalar(acc, rows, channels, c0, c1, q, out);
}

}  // namespace

const Kernels kScalarKernels = {s8_scalar, s32_scalar};

}  // namespace fixedpoint
}  // namespace qk
