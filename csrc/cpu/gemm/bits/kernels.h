// Internal interface of the binary / ternary matmuls (api.h): one call's operands, the
// per-ISA kernel table chosen by kernels() for the running ISA, and the shared helpers.
#pragma once
#include <cstdint>
#include <cstring>

#include "cpu/gemm/bits/api.h"
#include "cpu/runtime/isa.h"

namespace qk {
namespace bits {

// Floats per activation row of the AVX2 lookup tables: 8 per group of 3, 10 groups per block.
inline int64_t table_floats(int64_t K) { return bits_blocks(K) * kBitsGroups * 8; }

// One float-activation call. `tab` (rows of table_floats(K), 32-byte aligned) is built for
// the rows of x by Kernels::tables when the ISA has one, else null.
struct FloatProblem {
  const float* x;
  const float* tab;
  const uint8_t* w;
  const float* alpha;
  const float* bias;
  float* y;
  int64_t M, N, K;
  bool ternary;
};

// One XNOR call: xw (M, Kb) sign words of x in the weights' block layout (bit j of word h:
// x[m, 30h + j] < 0, zero beyond K and in bits 30, 31), beta (M).
struct XnorProblem {
  const uint32_t* xw;
  const float* beta;
  const uint8_t* w;
  const float* alpha;
  const float* bias;
  float* y;
  int64_t M, N, K;
};

// Range kernels over activation rows [m0, m1) and weight tiles [t0, t1). Each output is
// computed whole by one call, in an order that does not depend on the split.
struct Kernels {
  // The row's tables (binary: signed sums, ternary: subset sums), or null.
  void (*tables)(const float* x, int64_t K, bool ternary, float* tab);
  void (*float_tiles)(const FloatProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1);
  void (*xnor_tiles)(const XnorProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1);
  // The whole float-activation call where the level has a call-wide path (amx: amx.cpp, from
  // 16 rows); false leaves it to tables + float_tiles. Null elsewhere.
  bool (*float_call)(const FloatProblem& p);
};

extern const Kernels kScalarKernels;  // scalar.cpp
const Kernels* avx2_kernels();        // avx2.cpp
const Kernels* avx512_kernels();      // avx512.cpp
#ifdef QK_HAVE_AMX
const Kernels* amx_kernels();  // amx.cpp
#else
inline const Kernels* amx_kernels() { return nullptr; }  // the compiler has no AMX flags
#endif

// The table of the running ISA, one entry per qk::Isa (cpu/runtime/isa.h).
inline const Kernels& kernels() {
  const Kernels* const by_isa[] = {&kScalarKernels, avx2_kernels(), avx512_kernels(),
                                   amx_kernels()};
  return pick(by_isa);
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Valid-bit mask of block h of a K-weight row.
inline uint32_t block_mask(int64_t h, int64_t K) {
  const int64_t rem = K - kBitsBlock * h;
  return rem >= kBitsBlock ? kBitsWordMask : (uint32_t{1} << rem) - 1;
}

// The shared epilogues (identical float operations on every path).
inline float epilogue_f32(float acc, const float* alpha, const float* bias, int64_t n) {
  float v = acc * alpha[n];
  return bias ? v + bias[n] : v;
}

inline float epilogue_xnor(int64_t K, int64_t pop, float alpha, float beta, const float* bias,
                           int64_t n) {
  float v = static_cast<float>(K - 2 * pop) * (alpha * beta);
  return bias ? v + bias[n] : v;
}

}  // namespace bits
}  // namespace qk
