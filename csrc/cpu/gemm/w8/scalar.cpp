// Scalar reference kernels of the int8-weight matmuls: the definitions of docs/numerics.md
// written as plain loops over the packed layout (api.h). They are the fallback path and
// what the AVX2 kernels are checked against.
#include <cstdint>

#include "cpu/gemm/w8/kernels.h"

namespace qk {
namespace w8 {
namespace {

// Byte offset of code (column j of block b, row k) in a block of stride 16 * kp.
inline int64_t packed_at(int64_t b, int64_t j, int64_t kk, int64_t kp) {
  return b * kW8BlockN * kp + (kk / 4) * 64 + j * 4 + (kk % 4);
}

void s8s8_scalar(const int8_t* xq, int64_t m0, int64_t m1, const int8_t* packed, int64_t k,
                 int64_t b0, int64_t b1, const W8Out& out) {
  const int64_t kp = w8_padded_k(k);
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t i = m0; i < m1; ++i) {
      const int8_t* xr = xq + i * k;
      for (int64_t j = 0; j < kW8BlockN; ++j) {
        const int64_t col = b * kW8BlockN + j;
        if (col >= out.n) break;
        const int8_t* w = packed + packed_at(b, j, 0, kp);
        int32_t acc = 0;
        for (int64_t s = 0; s < kp / 4; ++s)
          for (int t = 0; t < 4 && 4 * s + t < k; ++t)
            acc += static_cast<int32_t>(xr[4 * s + t]) * static_cast<int32_t>(w[s * 64 + t]);
        if (out.acc) out.acc[i * out.n + col] = acc;
        else out.y[i * out.n + col] = w8a8_value(acc, out.sx[i], out.sw[col], out.bias, col);
      }
    }
  }
}

void f32_scalar(const float* x, int64_t m0, int64_t m1, const int8_t* packed, int64_t k,
                int64_t b0, int64_t b1, const W8Out& out) {
  const int64_t kp = w8_padded_k(k);
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t i = m0; i < m1; ++i) {
      const float* xr = x + i * k;
      for (int64_t j = 0; j < kW8BlockN; ++j) {
        const int64_t col = b * kW8BlockN + j;
        if (col >= out.n) break;
        float acc = 0.0f;
        for (int64_t kk = 0; kk < k; ++kk)
          acc += xr[kk] * static_cast<float>(packed[packed_at(b, j, kk, kp)]);
        out.y[i * out.n + col] = w8a16_value(acc, out.sw[col], out.bias, col);
      }
    }
  }
}

}  // namespace

const Kernels kScalarKernels = {s8s8_scalar, f32_scalar, nullptr, nullptr};

}  // namespace w8
}  // namespace qk
