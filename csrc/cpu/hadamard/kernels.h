// Internal interface of the FWHT (api.h): the per-ISA kernel table and the vector-width-generic
// butterfly passes that the SIMD paths instantiate with their own vector type.
#pragma once
#include <cstdint>

#include "cpu/hadamard/api.h"
#include "cpu/runtime/isa.h"

namespace qk {
namespace hadamard {

// Per-ISA kernels.
struct Kernels {
  // rows [0, rows) of x (row stride n): the whole normalized transform of each row.
  void (*rows)(float* x, int64_t rows, int64_t n, float scale);
};

extern const Kernels kScalarKernels;  // scalar.cpp
const Kernels* avx2_kernels();        // avx2.cpp
const Kernels* avx512_kernels();      // avx512.cpp

// The table of the running ISA, one entry per qk::Isa (cpu/runtime/isa.h).
inline const Kernels& kernels() {
  const Kernels* const by_isa[] = {&kScalarKernels, avx2_kernels(), avx512_kernels()};
  return pick(by_isa);
}

// The reference transform of one row (scalar.cpp); the SIMD paths use it below their width.
void row_scalar(float* v, int64_t n, float scale);

// Rows are cut into blocks of kBlock floats (16 KiB, L1-resident): each block runs the stages
// h < kBlock, then the whole row runs the stages h >= kBlock. Each stage's butterflies are
// independent, so this changes the memory order only, never the float operations.
constexpr int64_t kBlock = 4096;

// V: a SIMD vector of V::kW floats with load / store / add / sub / mul. Stage h (h >= kW) over
// len floats; the products by *s (the 1/sqrt(n) scale) when s is not null.
template <class V>
inline void pass2(float* v, int64_t len, int64_t h, const typename V::T* s) {
  for (int64_t i = 0; i < len; i += 2 * h)
    for (int64_t j = i; j < i + h; j += V::kW) {
      const auto a = V::load(v + j), b = V::load(v + j + h);
      auto p = V::add(a, b), m = V::sub(a, b);
      if (s) {
        p = V::mul(p, *s);
        m = V::mul(m, *s);
      }
      V::store(v + j, p);
      V::store(v + j + h, m);
    }
}

// Stages h and 2h in one pass (radix 4): the same additions as two pass2 calls.
template <class V>
inline void pass4(float* v, int64_t len, int64_t h, const typename V::T* s) {
  for (int64_t i = 0; i < len; i += 4 * h)
    for (int64_t j = i; j < i + h; j += V::kW) {
      const auto a = V::load(v + j), b = V::load(v + j + h);
      const auto c = V::load(v + j + 2 * h), d = V::load(v + j + 3 * h);
      const auto a1 = V::add(a, b), b1 = V::sub(a, b), c1 = V::add(c, d), d1 = V::sub(c, d);
      auto a2 = V::add(a1, c1), c2 = V::sub(a1, c1), b2 = V::add(b1, d1), d2 = V::sub(b1, d1);
      if (s) {
        a2 = V::mul(a2, *s);
        b2 = V::mul(b2, *s);
        c2 = V::mul(c2, *s);
        d2 = V::mul(d2, *s);
      }
      V::store(v + j, a2);
      V::store(v + j + h, b2);
      V::store(v + j + 2 * h, c2);
      V::store(v + j + 3 * h, d2);
    }
}

// Stages h0, 2 h0, ..., h1 / 2 over len floats (h0 >= kW; h0, h1 powers of two); s (when not
// null) is applied at stage h1 / 2.
template <class V>
inline void stages(float* v, int64_t len, int64_t h0, int64_t h1, const typename V::T* s) {
  int64_t h = h0;
  while (h < h1) {
    if (4 * h <= h1) {
      pass4<V>(v, len, h, 4 * h == h1 ? s : nullptr);
      h *= 4;
    } else {
      pass2<V>(v, len, h, s);
      h *= 2;
    }
  }
}

// One row with V's in-register stages h < kW (V::small(p, s): kW floats at p, scaled by *s
// when s is not null), then the passes above; rows shorter than kW take row_scalar.
template <class V>
inline void row_simd(float* v, int64_t n, float scale) {
  if (n < V::kW) {
    row_scalar(v, n, scale);
    return;
  }
  const typename V::T s = V::set1(scale);
  const int64_t blk = n < kBlock ? n : kBlock;
  for (int64_t c = 0; c < n; c += blk) {
    for (int64_t j = c; j < c + blk; j += V::kW) V::small(v + j, n == V::kW ? &s : nullptr);
    stages<V>(v + c, blk, V::kW, blk, blk == n ? &s : nullptr);
  }
  if (blk < n) stages<V>(v, n, blk, n, &s);
}

}  // namespace hadamard
}  // namespace qk
