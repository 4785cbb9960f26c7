// Internal interface of the int8-weight matmuls (api.h): the output description, the per-ISA
// kernel table chosen by kernels() for the running ISA, and the epilogues every path shares.
#pragma once
#include <cstdint>

#include "cpu/gemm/w8/api.h"
#include "cpu/runtime/isa.h"

namespace qk {
namespace w8 {

// What a kernel writes for the output tile rows [m0, m0 + rows) x block columns.
struct W8Out {
  const float* sx;     // per-row activation scale (W8A8), else null
  const float* sw;     // per-column weight scale, padded to Np
  const float* bias;   // padded to Np, or null
  float* y;            // (m, n) row-major float output, or null
  int32_t* acc;        // (m, n) row-major int32 output instead of y (gemm_s8s8_s32)
  int64_t n;           // valid columns (row stride of y / acc)
  const int32_t* xsum; // per-row sums of the s8s8 kernel's table entry `xsums`, or null
};

// Per-ISA kernels.
struct Kernels {
  // Rows [m0, m1) x blocks [b0, b1) of the int8 product; xq rows have stride k.
  void (*s8s8)(const int8_t* xq, int64_t m0, int64_t m1, const int8_t* packed, int64_t k,
               int64_t b0, int64_t b1, const W8Out& out);
  // Rows [m0, m1) x blocks [b0, b1) of the float-activation product; x rows have stride k.
  void (*f32)(const float* x, int64_t m0, int64_t m1, const int8_t* packed, int64_t k,
              int64_t b0, int64_t b1, const W8Out& out);
  // Per-row activation sums s8s8 needs (W8Out::xsum), computed once per call for rows [0, m);
  // null when it needs none.
  void (*xsums)(const int8_t* xq, int64_t m, int64_t k, int32_t* out);
  // The whole float-activation product (all m rows, all columns) where the level has a
  // call-wide path for it (amx: f32_call_amx); returns false to leave the call to f32. Null
  // elsewhere.
  bool (*f32_call)(const float* x, int64_t m, const int8_t* packed, int64_t n, int64_t k,
                   const W8Out& out);
};

extern const Kernels kScalarKernels;  // scalar.cpp
const Kernels* avx2_kernels();        // avx2.cpp
const Kernels* avx512_kernels();      // avx512.cpp
#ifdef QK_HAVE_AMX
const Kernels* amx_kernels();  // amx.cpp
#else
inline const Kernels* amx_kernels() { return nullptr; }  // the compiler has no AMX flags
#endif

// The AVX-512 int8 kernel and its row sums (avx512.cpp), which the AMX kernel calls for the
// rows that do not fill a 16-row tile.
void s8s8_avx512(const int8_t* xq, int64_t m0, int64_t m1, const int8_t* packed, int64_t k,
                 int64_t b0, int64_t b1, const W8Out& out);
void xsums_avx512(const int8_t* xq, int64_t m, int64_t k, int32_t* out);

// The AVX-512 float-activation kernel (f32_avx512.cpp), an entry of avx512_kernels().
void f32_avx512(const float* x, int64_t m0, int64_t m1, const int8_t* packed, int64_t k,
                int64_t b0, int64_t b1, const W8Out& out);

#ifdef QK_HAVE_AMX
// The amx level's W8A16 from 16 rows up, where cpu_has_amx_bf16() (f32_amx.cpp).
bool f32_call_amx(const float* x, int64_t m, const int8_t* packed, int64_t n, int64_t k,
                  const W8Out& out);
#endif

// The table of the running ISA, one entry per qk::Isa (cpu/runtime/isa.h).
inline const Kernels& kernels() {
  const Kernels* const by_isa[] = {&kScalarKernels, avx2_kernels(), avx512_kernels(),
                                   amx_kernels()};
  return pick(by_isa);
}

// The float epilogues, shared by every path so that W8A8 outputs agree bit for bit.
inline float w8a8_value(int32_t acc, float sx, float sw, const float* bias, int64_t j) {
  float v = (static_cast<float>(acc) * sx) * sw;
  return bias ? v + bias[j] : v;
}
inline float w8a16_value(float acc, float sw, const float* bias, int64_t j) {
  float v = acc * sw;
  return bias ? v + bias[j] : v;
}

}  // namespace w8
}  // namespace qk
