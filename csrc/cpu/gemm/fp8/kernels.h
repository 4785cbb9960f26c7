// Internal interface of the FP8-weight matmul (api.h): one call's operands and the per-ISA
// kernel table, chosen by kernels() for the running ISA.
#pragma once
#include <cstdint>

#include "cpu/gemm/fp8/api.h"
#include "cpu/runtime/isa.h"

namespace qk {
namespace fp8 {

struct Fp8Args {
  const float* x;
  const uint8_t* w;
  const float* scales;
  const float* bias;
  float* y;
  int64_t m, n, k, group;
  int fmt;
};

// Per-ISA kernels. gemm: y[m0..m1) x [n0..n1) of the product. Which algorithm runs depends
// on the whole call's M only, never on the split, so results do not depend on the thread count.
// call: the whole call where the level has a call-wide path (amx: amx.cpp, from 16 rows);
// false leaves it to gemm. Null elsewhere.
struct Kernels {
  void (*gemm)(const Fp8Args& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  bool (*call)(const Fp8Args& a);
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

// Rows of x at or below which the AVX2 kernel decodes on the fly (GEMV) instead of tiling.
constexpr int64_t kFp8GemvRows = 2;

}  // namespace fp8
}  // namespace qk
