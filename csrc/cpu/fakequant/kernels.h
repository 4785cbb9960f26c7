// Internal interface of the fused fake quantization (api.h): the per-ISA kernel table, the
// scalar kernels (scalar.cpp; the SIMD paths finish their tails with them) and the
// vector-width-generic loops that avx2.cpp / avx512.cpp instantiate with their vector type.
#pragma once
#include <cstdint>

#include "core/fakequant.h"
#include "cpu/fakequant/api.h"
#include "cpu/runtime/isa.h"

namespace qk {
namespace fakequant {

// One channel's parameters (a run of elements sharing them); b = 0 without an offset.
struct Channel {
  float s, inv, b;
  bool has_b;
  float lo, hi;
};

// A row along which the channel changes every element (channels on the last axis): element j
// uses s[j], inv[j] and b[j] (b null: no offset).
struct Row {
  const float* s;
  const float* inv;
  const float* b;
  float lo, hi;
};

struct Kernels {
  // y[0, n) of a run of one channel.
  void (*fwd_run)(const float* x, float* y, int64_t n, const Channel& c);
  // grad_x of a run, and lane sums: ls[i % 8] += grad_y[i] * s_term, lb[i % 8] += grad_y[i]
  // outside (else + 0), for i = 0 .. n-1 in order.
  void (*bwd_run)(const float* x, const float* gy, float* gx, int64_t n, const Channel& c,
                  double* ls, double* lb);
  // One row of n channels.
  void (*fwd_row)(const float* x, float* y, int64_t n, const Row& r);
  // grad_x of a row, and per channel: as[j] += grad_y[j] * s_term, ab[j] += grad_y[j] outside.
  void (*bwd_row)(const float* x, const float* gy, float* gx, int64_t n, const Row& r,
                  double* as, double* ab);
};

extern const Kernels kScalarKernels;  // scalar.cpp
const Kernels* avx2_kernels();        // avx2.cpp
const Kernels* avx512_kernels();      // avx512.cpp

inline const Kernels& kernels() {
  const Kernels* const by_isa[] = {&kScalarKernels, avx2_kernels(), avx512_kernels()};
  return pick(by_isa);
}

// The scalar kernels (the tails of the SIMD loops; a row's pointers are offset by the caller).
void fwd_run_scalar(const float* x, float* y, int64_t n, const Channel& c);
void bwd_run_scalar(const float* x, const float* gy, float* gx, int64_t n, const Channel& c,
                    double* ls, double* lb);
void fwd_row_scalar(const float* x, float* y, int64_t n, const Row& r);
void bwd_row_scalar(const float* x, const float* gy, float* gx, int64_t n, const Row& r,
                    double* as, double* ab);

inline Row shifted(const Row& r, int64_t i) {
  return {r.s + i, r.inv + i, r.b ? r.b + i : nullptr, r.lo, r.hi};
}

// V: kW floats per vector T; V::fwd / V::bwd the rule of core/fakequant.h on a vector;
// V::Acc 8 double lanes with add(acc, a, b): lane i % 8 += a[i] * b[i] in element order;
// V::mem_add(p, a, b): p[i] += a[i] * b[i] (double).
template <class V>
void fwd_run_simd(const float* x, float* y, int64_t n, const Channel& c) {
  using T = typename V::T;
  const T s = V::set1(c.s), inv = V::set1(c.inv), b = V::set1(c.b);
  const T lo = V::set1(c.lo), hi = V::set1(c.hi);
  int64_t i = 0;
  if (c.has_b)
    for (; i + V::kW <= n; i += V::kW)
      V::store(y + i, V::fwd(V::load(x + i), s, inv, b, true, lo, hi));
  else
    for (; i + V::kW <= n; i += V::kW)
      V::store(y + i, V::fwd(V::load(x + i), s, inv, b, false, lo, hi));
  fwd_run_scalar(x + i, y + i, n - i, c);
}

template <class V>
void bwd_run_simd(const float* x, const float* gy, float* gx, int64_t n, const Channel& c,
                  double* ls, double* lb) {
  using T = typename V::T;
  const T inv = V::set1(c.inv), b = V::set1(c.b), lo = V::set1(c.lo), hi = V::set1(c.hi);
  const T one = V::set1(1.0f);
  typename V::Acc as = V::acc_load(ls), ab = V::acc_load(lb);
  int64_t i = 0;
  for (; i + V::kW <= n; i += V::kW) {
    T g, st, go;
    const T gyv = V::load(gy + i);
    V::bwd(V::load(x + i), gyv, inv, b, lo, hi, &g, &st, &go);
    V::store(gx + i, g);
    V::acc_add(as, gyv, st);
    V::acc_add(ab, go, one);
  }
  V::acc_store(as, ls);
  V::acc_store(ab, lb);
  bwd_run_scalar(x + i, gy + i, gx + i, n - i, c, ls, lb);  // i % 8 == 0: same lanes
}

template <class V>
void fwd_row_simd(const float* x, float* y, int64_t n, const Row& r) {
  using T = typename V::T;
  const T lo = V::set1(r.lo), hi = V::set1(r.hi), zero = V::set1(0.0f);
  const bool has_b = r.b != nullptr;
  int64_t i = 0;
  for (; i + V::kW <= n; i += V::kW) {
    const T b = has_b ? V::load(r.b + i) : zero;
    V::store(y + i, V::fwd(V::load(x + i), V::load(r.s + i), V::load(r.inv + i), b, has_b, lo, hi));
  }
  fwd_row_scalar(x + i, y + i, n - i, shifted(r, i));
}

template <class V>
void bwd_row_simd(const float* x, const float* gy, float* gx, int64_t n, const Row& r,
                  double* as, double* ab) {
  using T = typename V::T;
  const T lo = V::set1(r.lo), hi = V::set1(r.hi), zero = V::set1(0.0f), one = V::set1(1.0f);
  int64_t i = 0;
  for (; i + V::kW <= n; i += V::kW) {
    T g, st, go;
    const T gyv = V::load(gy + i);
    const T b = r.b ? V::load(r.b + i) : zero;
    V::bwd(V::load(x + i), gyv, V::load(r.inv + i), b, lo, hi, &g, &st, &go);
    V::store(gx + i, g);
    V::mem_add(as + i, gyv, st);
    V::mem_add(ab + i, go, one);
  }
  bwd_row_scalar(x + i, gy + i, gx + i, n - i, shifted(r, i), as + i, ab + i);
}

// The table of a SIMD ISA.
template <class V>
constexpr Kernels simd_kernels() {
  return {fwd_run_simd<V>, bwd_run_simd<V>, fwd_row_simd<V>, bwd_row_simd<V>};
}

}  // namespace fakequant
}  // namespace qk
