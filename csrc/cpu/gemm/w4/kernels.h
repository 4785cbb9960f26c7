// Internal interface of the int4 matmul (api.h): one call's operands and the per-ISA
// kernel table, chosen by kernels() for the running ISA.
#pragma once
#include <cstdint>

#include "cpu/gemm/w4/api.h"
#include "cpu/runtime/isa.h"

namespace qk {
namespace w4 {

// One call's operands. For the fast mode, x has been quantized per block of 32 into xq (m, k)
// int8 with scale dx (m, k/32) and code sum xs (m, k/32, as float: exact).
struct Problem {
  const float* x;
  const uint8_t* packed;
  const float* scales;
  const int32_t* zeros;
  const float* bias;
  float* y;
  int64_t m, n, k, group;
  const int8_t* xq;
  const float* dx;
  const float* xs;
  const float* zeros_f;  // float zero points of the stored code u (HQQ) or null: see api.h
  const uint8_t* table8;  // fast mode: code u = table8[nibble], zc = 128 (api.h), or null
};

// Per-ISA kernels. quantize_x: rows [m0, m1) of x into xq / dx / xs. The matmul kernels
// compute y for tiles [t0, t1) and rows [m0, m1), each output in the order of the definition,
// so results never depend on the split.
struct Kernels {
  void (*quantize_x)(const float* x, int64_t k, int64_t m0, int64_t m1, int8_t* xq, float* dx,
                     float* xs);
  void (*fast)(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1);
  void (*exact)(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1);
  // The fast mode over a whole call of >= 16 rows where the level has such a path (amx:
  // tile/amx.h fast_call); null elsewhere (tile tasks of `fast`).
  void (*fast_call)(const Problem& p, int64_t tiles, bool parallel);
};

extern const Kernels kScalarKernels;  // scalar.cpp
const Kernels* avx2_kernels();        // avx2.cpp
const Kernels* avx512_kernels();      // avx512.cpp
#ifdef QK_HAVE_AMX
// The fast mode on the tile unit, the rest (and rows short of a tile) on avx512's (amx.cpp).
const Kernels* amx_kernels();
#else
inline const Kernels* amx_kernels() { return nullptr; }  // the compiler has no AMX flags
#endif

// The table of the running ISA, one entry per qk::Isa (cpu/runtime/isa.h).
inline const Kernels& kernels() {
  const Kernels* const by_isa[] = {&kScalarKernels, avx2_kernels(), avx512_kernels(),
                                   amx_kernels()};
  return pick(by_isa);
}

}  // namespace w4
}  // namespace qk
