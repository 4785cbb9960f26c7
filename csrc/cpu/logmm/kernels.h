// Internal interface of the log-domain matmul (api.h): the operands decoded once by entry.cpp
// and the per-ISA kernel table.
#pragma once
#include <cstdint>

#include "cpu/logmm/api.h"
#include "cpu/runtime/isa.h"

namespace qk {
namespace logmm {

// Exponent of a zero code: far below any real one, so every product with it lands under the
// -126 cut and is dropped by the same test as an underflowing one.
constexpr int32_t kZeroExp = -(1 << 20);

struct Args {
  const int32_t* xe;   // (M, K) exponents (kZeroExp for zero codes)
  const uint32_t* xs;  // (M, K) sign bits (0 or 0x80000000)
  const int32_t* we;   // (K, Np) exponents of w, transposed, N padded to Np (a multiple of 16)
  const uint32_t* ws;  // (K, Np) sign bits
  const float* table;  // 2^f entries: 2^(j / 2^f)
  const float* xscale;
  const float* wscale;
  float* out;          // (M, N)
  int64_t N, Np, K;
  int frac_bits;
};

// The product magnitude of one exponent sum s (scalar definition shared by every path).
inline float product(const float* table, int32_t s, int f) {
  const int32_t si = s >> f;  // arithmetic shift: floor
  if (si < -126) return 0.0f;
  const int32_t fr = s & ((1 << f) - 1);
  union {
    uint32_t u;
    float v;
  } p2;
  p2.u = static_cast<uint32_t>(si + 127) << 23;
  return table[fr] * p2.v;
}

struct Kernels {
  // rows [m0, m1) of out.
  void (*rows)(const Args& a, int64_t m0, int64_t m1);
};

extern const Kernels kScalarKernels;  // scalar.cpp
const Kernels* avx2_kernels();        // avx2.cpp
const Kernels* avx512_kernels();      // avx512.cpp

inline const Kernels& kernels() {
  const Kernels* const by_isa[] = {&kScalarKernels, avx2_kernels(), avx512_kernels()};
  return pick(by_isa);
}

}  // namespace logmm
}  // namespace qk
