// Internal per-ISA range kernels. Each works on the element range [e0, e1) of a flat array
// whose groups of `group` elements share scale[e / group]; the public entry points in
// entry.cpp split work into ranges and run them on the thread pool.
#pragma once
#include <cmath>
#include <cstdint>

#include "cpu/quant/api.h"
#include "cpu/runtime/isa.h"

namespace qk {
namespace quant {

// How a dynamic kernel derives a group's scale (see affine_params_from_stats).
struct ScaleSpec {
  int rule;
  float qpos;  // divisor of amax (kScaleAbsMax)
  int emax;    // kScalePow2MX
};

struct Kernels {
  bool (*affine)(const float* x, int64_t e0, int64_t e1, int64_t group, const float* scale,
                 const int32_t* zp, const AffineSpec& spec, uint8_t* codes);
  // `stream`: the output is too large for the caches; write it with streaming stores.
  void (*dequant_affine)(const uint8_t* codes, int64_t e0, int64_t e1, int64_t group,
                         const float* scale, const int32_t* zp, bool is_signed, float offset,
                         float* out, bool stream);
  bool (*codebook)(const float* x, int64_t e0, int64_t e1, int64_t group, const float* scale,
                   const CodebookSpec& spec, uint8_t* codes);
  void (*lut)(const uint8_t* codes, int64_t e0, int64_t e1, int64_t group, const float* scale,
              const float* lut, float* out, bool stream);
  // min, max and a NaN/Inf flag over x[0, n)
  void (*minmax)(const float* x, int64_t n, float* lo, float* hi, bool* bad);
  // Groups [g0, g1): statistics, the group's scale (and zero point), then its codes.
  bool (*affine_groups)(const float* x, int64_t g0, int64_t g1, int64_t group,
                        const AffineSpec& spec, const ScaleSpec& ss, float* scale, int32_t* zp,
                        uint8_t* codes);
  bool (*codebook_groups)(const float* x, int64_t g0, int64_t g1, int64_t group,
                          const CodebookSpec& spec, const ScaleSpec& ss, float* scale,
                          uint8_t* codes);
};

extern const Kernels kScalarKernels;  // scalar.cpp
const Kernels* avx2_kernels();        // avx2.cpp
const Kernels* avx512_kernels();      // avx512.cpp

// The table of the running ISA, one entry per qk::Isa.
inline const Kernels& kernels() {
  const Kernels* const by_isa[] = {&kScalarKernels, avx2_kernels(), avx512_kernels()};
  return pick(by_isa);
}

// Scalar kernels, also the fallback of the AVX2 / AVX-512 ones for modes they do not vectorize.
bool affine_scalar(const float* x, int64_t e0, int64_t e1, int64_t group, const float* scale,
                   const int32_t* zp, const AffineSpec& spec, uint8_t* codes);
void dequant_affine_scalar(const uint8_t* codes, int64_t e0, int64_t e1, int64_t group,
                           const float* scale, const int32_t* zp, bool is_signed, float offset,
                           float* out, bool stream = false);
bool codebook_scalar(const float* x, int64_t e0, int64_t e1, int64_t group, const float* scale,
                     const CodebookSpec& spec, uint8_t* codes);
void lut_scalar(const uint8_t* codes, int64_t e0, int64_t e1, int64_t group, const float* scale,
                const float* lut, float* out, bool stream = false);
void minmax_scalar(const float* x, int64_t n, float* lo, float* hi, bool* bad);

bool affine_groups_scalar(const float* x, int64_t g0, int64_t g1, int64_t group,
                          const AffineSpec& spec, const ScaleSpec& ss, float* scale, int32_t* zp,
                          uint8_t* codes);
bool codebook_groups_scalar(const float* x, int64_t g0, int64_t g1, int64_t group,
                            const CodebookSpec& spec, const ScaleSpec& ss, float* scale,
                            uint8_t* codes);

// max(|lo|, |hi|) with plain comparisons (lo/hi come from the NaN-skipping min/max loops).
inline float amax_of(float lo, float hi) {
  float a = lo < 0.0f ? -lo : lo, b = hi < 0.0f ? -hi : hi;
  return a > b ? a : b;
}

// Sum of |x| in order, in double: the same on every path and thread count.
inline double sum_abs(const float* x, int64_t n) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += std::fabs(static_cast<double>(x[i]));
  return acc;
}

// The per-group loop shared by every path: `minmax` and `quant(g)` are the path's kernels.
template <typename MinMax, typename Quant>
bool dynamic_groups(const float* x, int64_t g0, int64_t g1, int64_t group, const ScaleSpec& ss,
                    const AffineSpec& spec, float* scale, int32_t* zp, MinMax minmax,
                    Quant quant) {
  bool bad = false;
  for (int64_t g = g0; g < g1; ++g) {
    const float* xg = x + g * group;
    float lo, hi;
    bool b;
    minmax(xg, group, &lo, &hi, &b);
    double sa = ss.rule == kScaleMeanAbs ? sum_abs(xg, group) : 0.0;
    int32_t z;
    affine_params_from_stats(lo, hi, amax_of(lo, hi), sa, group, ss.rule, ss.qpos, ss.emax, spec,
                             &scale[g], &z);
    if (zp) zp[g] = z;
    bad |= b;
    bad |= quant(g);
  }
  return bad;
}

}  // namespace quant
}  // namespace qk
