// Internal interface of the fixed-point requantization (api.h): the per-ISA kernel table and
// the clamp bounds shared by every path.
#pragma once
#include <cstdint>

#include "cpu/fixedpoint/api.h"
#include "cpu/runtime/isa.h"

namespace qk {
namespace fixedpoint {

// clamp(v + zp, qmin, qmax) == clamp(v, lo, hi) + zp for an int32 v, with lo / hi the bounds
// below (no int32 overflow on either side).
struct Bounds {
  int32_t lo, hi, zp;
};

inline Bounds bounds(const Requant& q) {
  int64_t lo = int64_t{q.qmin} - q.zero_point, hi = int64_t{q.qmax} - q.zero_point;
  lo = lo < kInt32Min ? kInt32Min : lo;
  hi = hi > kInt32Max ? kInt32Max : hi;
  return {static_cast<int32_t>(lo), static_cast<int32_t>(hi), q.zero_point};
}

// One output element (the definition, used by every path for its tail).
inline int32_t requant_one(int32_t x, int32_t m0, int32_t shift, const Bounds& b) {
  int32_t v = multiply_by_quantized_multiplier(x, m0, shift);
  v = v < b.lo ? b.lo : v > b.hi ? b.hi : v;
  return v + b.zp;
}

// Per-ISA kernels: rows [0, rows) and channels [c0, c1) of acc (row stride `channels`).
struct Kernels {
  void (*s8)(const int32_t* acc, int64_t rows, int64_t channels, int64_t c0, int64_t c1,
             const Requant& q, int8_t* out);
  void (*s32)(const int32_t* acc, int64_t rows, int64_t channels, int64_t c0, int64_t c1,
              const Requant& q, int32_t* out);
};

extern const Kernels kScalarKernels;  // scalar.cpp
const Kernels* avx2_kernels();        // avx2.cpp
const Kernels* avx512_kernels();      // avx512.cpp

// The table of the running ISA, one entry per qk::Isa (cpu/runtime/isa.h).
inline const Kernels& kernels() {
  const Kernels* const by_isa[] = {&kScalarKernels, avx2_kernels(), avx512_kernels()};
  return pick(by_isa);
}

// Channels [c0, c1) of every row with requant_one (the scalar kernel; the SIMD tails).
template <class Out>
inline void rows_scalar(const int32_t* acc, int64_t rows, int64_t channels, int64_t c0,
                        int64_t c1, const Requant& q, Out* out) {
  const Bounds b = bounds(q);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t p = q.per_channel ? c : 0;
      out[r * channels + c] =
          static_cast<Out>(requant_one(acc[r * channels + c], q.m0[p], q.shift[p], b));
    }
}

}  // namespace fixedpoint
}  // namespace qk
