// Scalar int4 matmul kernels: the executable form of docs/numerics.md "int4 group-wise
// matmul", element by element. The AVX2 kernels perform the same float32 operations in the
// same order (FMA included, via std::fma here), so both paths give identical bits.
#include <cfloat>
#include <cmath>

#include "cpu/gemm/tile/ref.h"
#include "cpu/gemm/w4/kernels.h"

namespace qk {
namespace w4 {
namespace {

// Fast-mode activation quantization, per block of 32: dx = amax / 127, xq = clamp(rne(x * (1
// / dx)), -127, 127). A block with NaN/Inf gets dx = NaN (its outputs become NaN); a block with
// dx < FLT_MIN (zero or subnormal) gets dx = 0 and xq = 0.
void quantize_x_scalar(const float* x, int64_t k, int64_t m0, int64_t m1, int8_t* xq, float* dx,
                       float* xs) {
  const int64_t nb = k / kW4Block;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * k + b * kW4Block;
      int8_t* qb = xq + m * k + b * kW4Block;
      float amax = 0.0f;
      bool bad = false;
      for (int j = 0; j < kW4Block; ++j) {
        float a = std::fabs(xb[j]);
        if (!(a <= FLT_MAX)) bad = true;
        else if (a > amax) amax = a;
      }
      float d = amax / 127.0f;
      int32_t sum = 0;
      if (bad || d < FLT_MIN) {
        for (int j = 0; j < kW4Block; ++j) qb[j] = 0;
        d = bad ? NAN : 0.0f;
      } else {
        const float r = 1.0f / d;
        for (int j = 0; j < kW4Block; ++j) {
          float v = std::nearbyint(xb[j] * r);
          v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
          qb[j] = static_cast<int8_t>(v);
          sum += qb[j];
        }
      }
      dx[m * nb + b] = d;
      xs[m * nb + b] = static_cast<float>(sum);
    }
  }
}

// (8 + z) as float: the code offset of a group (unsigned nibble u = q + 8, value u - zc); with
// float zero points zc is the given float itself.
struct Offset {
  const Problem& p;
  float operator()(int64_t pidx) const {
    if (p.table8) return 128.0f;  // codebook: u = t8 + 128
    if (p.zeros_f) return p.zeros_f[pidx];
    return 8.0f + (p.zeros ? static_cast<float>(p.zeros[pidx]) : 0.0f);
  }
};

struct Code {
  const Problem& p;
  int operator()(int64_t n, int64_t k) const {
    const int c = w4_nibble(p.packed, p.k, n, k);
    return p.table8 ? p.table8[c] : c;
  }
};

void fast_scalar(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  tile_ref::fast<kW4Rows, kW4Block>(p, t0, t1, m0, m1, Code{p}, Offset{p});
}

void exact_scalar(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  tile_ref::exact<kW4Rows>(p, t0, t1, m0, m1, Code{p}, Offset{p});
}

}  // namespace

const Kernels kScalarKernels = {quantize_x_scalar, fast_scalar, exact_scalar, nullptr};

}  // namespace w4
}  // namespace qk
