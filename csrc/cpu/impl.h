// Internal per-ISA range kernels. Each works on the element range [e0, e1) of a flat array
// whose groups of `group` elements share scale[e / group]; the public entry points in
// dispatch.cpp split work into ranges and run them on the thread pool.
#pragma once
#include <cstdint>
#include "cpu/kernels.h"

namespace qk {
namespace impl {

struct Paths {
  bool (*affine)(const float* x, int64_t e0, int64_t e1, int64_t group, const float* scale,
                 const int32_t* zp, const AffineSpec& spec, uint8_t* codes);
  void (*dequant_affine)(const uint8_t* codes, int64_t e0, int64_t e1, int64_t group,
                         const float* scale, const int32_t* zp, bool is_signed, float offset,
                         float* out);
  bool (*codebook)(const float* x, int64_t e0, int64_t e1, int64_t group, const float* scale,
                   const CodebookSpec& spec, uint8_t* codes);
  void (*lut)(const uint8_t* codes, int64_t e0, int64_t e1, int64_t group, const float* scale,
              const float* lut, float* out);
  // min, max and a NaN/Inf flag over x[0, n)
  void (*minmax)(const float* x, int64_t n, float* lo, float* hi, bool* bad);
};

extern const Paths kScalarPaths;
const Paths* avx2_paths();  // defined in quant_avx2.cpp

// Scalar kernels, also the fallback of the AVX2 ones for modes they do not vectorize.
bool affine_scalar(const float* x, int64_t e0, int64_t e1, int64_t group, const float* scale,
                   const int32_t* zp, const AffineSpec& spec, uint8_t* codes);
void dequant_affine_scalar(const uint8_t* codes, int64_t e0, int64_t e1, int64_t group,
                           const float* scale, const int32_t* zp, bool is_signed, float offset,
                           float* out);
bool codebook_scalar(const float* x, int64_t e0, int64_t e1, int64_t group, const float* scale,
                     const CodebookSpec& spec, uint8_t* codes);
void lut_scalar(const uint8_t* codes, int64_t e0, int64_t e1, int64_t group, const float* scale,
                const float* lut, float* out);
void minmax_scalar(const float* x, int64_t n, float* lo, float* hi, bool* bad);

}  // namespace impl
}  // namespace qk
