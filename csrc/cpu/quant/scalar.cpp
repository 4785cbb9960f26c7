// Scalar reference kernels: a direct loop over the csrc/core rules.
#include <cmath>

#include "cpu/quant/kernels.h"

namespace qk {
namespace quant {

bool affine_scalar(const float* x, int64_t e0, int64_t e1, int64_t group, const float* scale,
                   const int32_t* zp, const AffineSpec& spec, uint8_t* codes, bool /*stream*/) {
  bool bad = false;
  for (int64_t e = e0; e < e1; ++e) {
    int64_t g = e / group;
    float v = x[e];
    bad |= !std::isfinite(v);
    int32_t q = affine_code(v * (1.0f / scale[g]), zp ? zp[g] : 0, spec, static_cast<uint64_t>(e));
    codes[e] = static_cast<uint8_t>(q & 0xFF);
  }
  return bad;
}

void dequant_affine_scalar(const uint8_t* codes, int64_t e0, int64_t e1, int64_t group,
                           const float* scale, const int32_t* zp, bool is_signed, float offset,
                           float* out, bool /*stream*/) {
  for (int64_t e = e0; e < e1; ++e) {
    int64_t g = e / group;
    int32_t c = is_signed ? static_cast<int32_t>(static_cast<int8_t>(codes[e])) : codes[e];
    out[e] = affine_value(c, zp ? zp[g] : 0, offset, scale[g]);
  }
}

bool codebook_scalar(const float* x, int64_t e0, int64_t e1, int64_t group, const float* scale,
                     const CodebookSpec& spec, uint8_t* codes) {
  bool bad = false;
  for (int64_t e = e0; e < e1; ++e) {
    float v = x[e];
    bad |= !std::isfinite(v);
    codes[e] = codebook_code(v * (1.0f / scale[e / group]), spec, static_cast<uint64_t>(e));
  }
  return bad;
}

void lut_scalar(const uint8_t* codes, int64_t e0, int64_t e1, int64_t group, const float* scale,
                const float* lut, float* out, bool /*stream*/) {
  for (int64_t e = e0; e < e1; ++e) out[e] = lut[codes[e]] * scale[e / group];
}

void minmax_scalar(const float* x, int64_t n, float* lo, float* hi, bool* bad) {
  float mn = INFINITY, mx = -INFINITY;
  bool b = false;
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i];
    b |= !std::isfinite(v);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  *lo = mn;
  *hi = mx;
  *bad = b;
}

bool affine_groups_scalar(const float* x, int64_t g0, int64_t g1, int64_t group,
                          const AffineSpec& spec, const ScaleSpec& ss, float* scale, int32_t* zp,
                          uint8_t* codes, bool /*stream*/) {
  return dynamic_groups(x, g0, g1, group, ss, spec, scale, zp, minmax_scalar, [&](int64_t g) {
    return affine_scalar(x, g * group, (g + 1) * group, group, scale, zp, spec, codes);
  });
}

bool codebook_groups_scalar(const float* x, int64_t g0, int64_t g1, int64_t group,
                            const CodebookSpec& spec, const ScaleSpec& ss, float* scale,
                            uint8_t* codes) {
  const AffineSpec none{0, 0, 0, 0, 0.0f, 0};
  return dynamic_groups(x, g0, g1, group, ss, none, scale, nullptr, minmax_scalar, [&](int64_t g) {
    return codebook_scalar(x, g * group, (g + 1) * group, group, scale, spec, codes);
  });
}

const Kernels kScalarKernels = {affine_scalar,  dequant_affine_scalar, codebook_scalar,
                            lut_scalar,     minmax_scalar,         affine_groups_scalar,
                            codebook_groups_scalar};

}  // namespace quant
}  // namespace qk
