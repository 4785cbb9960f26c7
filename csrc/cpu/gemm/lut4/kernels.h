// Internal interface of the 4-bit lookup-table matmul (api.h): one call's operands, the
// double-quantized scale rule and the per-ISA kernel table, chosen by kernels().
#pragma once
#include <cfloat>
#include <cstdint>

#include "cpu/gemm/lut4/api.h"
#include "cpu/runtime/isa.h"

namespace qk {
namespace lut4 {

// y[m0..m1) x [n0..n1) of the product (bias added when non-null); rows of x have stride k,
// rows of y stride n.
struct Lut4Args {
  const float* x;
  const uint8_t* packed;
  const float* scales;
  const float* table16;
  const float* bias;
  float* y;
  int64_t m, n, k, group;
  int64_t scale_row0 = 0;  // scales holds rows [scale_row0, ...) of the (N, K/G) scales
  // double-quantized scales (gemm_lut4_dq; the entry point rebuilds them into `scales`)
  const int8_t* qscales = nullptr;
  const float* scale2 = nullptr;
  float mean = 0.0f;
  int64_t dq_group = 1;
};

// One double-quantized block scale: max(float(code) * scale2 + mean, FLT_MIN), a float32
// multiply then a float32 add (never fused: the build uses -ffp-contract=off), as
// python/qkern/quantize.py double_quantize_scales computes the scales it quantizes with.
inline float lut4_dq_scale(int8_t code, float scale2, float mean) {
  const float s = static_cast<float>(code) * scale2 + mean;
  return s < FLT_MIN ? FLT_MIN : s;  // NaN stays NaN, as torch's clamp_min
}

// Per-ISA kernels. gemm: y[m0..m1) x [n0..n1) of the product with float scales (Lut4Args
// above); which algorithm runs depends on the whole call's M only, never on the split.
struct Kernels {
  void (*gemm)(const Lut4Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
};

extern const Kernels kScalarKernels;  // scalar.cpp
const Kernels* avx2_kernels();        // avx2.cpp
const Kernels* avx512_kernels();      // avx512.cpp

// The table of the running ISA, one entry per qk::Isa (cpu/runtime/isa.h).
inline const Kernels& kernels() {
  const Kernels* const by_isa[] = {&kScalarKernels, avx2_kernels(), avx512_kernels()};
  return pick(by_isa);
}

}  // namespace lut4
}  // namespace qk
