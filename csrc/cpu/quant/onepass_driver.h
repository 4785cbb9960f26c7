// The batch driver of the one-pass dynamic symmetric quantizer, shared by avx2.cpp and
// avx512.cpp (the Kernels::affine_groups entry of both). The common case (absmax scale,
// mid-tread, nearest-even, signed codes of at most 8 bits, groups of a multiple of the ISA's
// block) runs in batches of up to one vector's lanes of groups that fit in L1 (<= 8 KiB, or one
// group of a per-channel row): the ISA takes the maxima of |x| on the integer bits (|x| bits
// order like the floats, and NaN / Inf bits lie above every finite value), reduces the batch by
// one transpose and derives its scales and reciprocals in one vector division each; then the
// batch's codes are written from L1 while the next batch is prefetched. The float operations
// are the reference's (scale = sanitize(amax / qpos), t = x * (1/scale), clamp, round to nearest
// even), so the bits are identical. A batch holding NaN / Inf is redone by the general path,
// whose NaN-skipping statistics give the reference's scales.
//
// No intrinsics here: this header is included from files compiled with different ISA flags, so
// everything ISA-specific comes in through the traits type `T`, which each file defines in its
// anonymous namespace (distinct types, hence distinct instantiations: no ODR clash):
//   using Vec;                                      the float vector (clamp bounds)
//   static constexpr int64_t kLanes;                groups per batch at most (the lane count)
//   static constexpr int64_t kGroupMultiple;        groups must be a multiple of this
//   static Vec splat(float v);
//   static bool batch_scales(const float* xb, int64_t nb, int64_t group, float qpos,
//                            float* scale, int32_t* zp, float* rcp);
//       the scales (sanitized amax / qpos) of the nb groups at xb into scale[0, nb), zeros into
//       zp[0, nb) (when zp is set) and the reciprocals into rcp (kLanes floats, 64-byte
//       aligned); false, with nothing written, when a group holds NaN / Inf
//   template <bool kL1> static void codes(const float* x, int64_t n, float r, Vec lo, Vec hi,
//                                         uint8_t* out, bool stream, const float* pf,
//                                         int64_t pf_n);
//       the codes of one group x[0, n) with reciprocal scale r, prefetching pf[0, pf_n)
//       alongside into L1 (kL1) or L2
//   static void fence();                            after streaming stores
// and `Path` is the file's VectorPath (the general path).
#pragma once
#include <cstdint>

#include "cpu/quant/kernels.h"

namespace qk {
namespace quant {

template <class T, class Path>
bool onepass_affine_groups(const float* x, int64_t g0, int64_t g1, int64_t group,
                           const AffineSpec& spec, const ScaleSpec& ss, float* scale,
                           int32_t* zp, uint8_t* codes, bool stream) {
  constexpr int64_t kBatchBytes = 8192;
  const bool eligible = ss.rule == kScaleAbsMax && spec.shape == kMidTread &&
                        spec.rounding == kNearestEven && spec.qmin >= -128 &&
                        spec.qmax <= 127 && group % T::kGroupMultiple == 0;
  if (!eligible) return Path::affine_groups(x, g0, g1, group, spec, ss, scale, zp, codes, stream);
  const bool stream_all = stream_codes(stream, codes, g0 * group, group);
  int64_t per = kBatchBytes / (4 * group);
  per = per < 1 ? 1 : (per > T::kLanes ? T::kLanes : per);
  const bool into_l1 = 4 * group * per <= kBatchBytes;  // both batches fit there
  const typename T::Vec lo = T::splat(static_cast<float>(spec.qmin));
  const typename T::Vec hi = T::splat(static_cast<float>(spec.qmax));
  alignas(64) float rcp[T::kLanes];
  bool bad = false;
  for (int64_t g = g0; g < g1; g += per) {
    const int64_t nb = per < g1 - g ? per : g1 - g;
    const float* xb = x + g * group;
    if (!T::batch_scales(xb, nb, group, ss.qpos, scale + g, zp ? zp + g : nullptr, rcp)) {
      bad |= Path::affine_groups(x, g, g + nb, group, spec, ss, scale, zp, codes, stream_all);
      continue;
    }
    const int64_t next = g + nb < g1 ? ((per < g1 - g - nb ? per : g1 - g - nb) * group) : 0;
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t off = j * group;  // the next batch's lines, spread over this one's groups
      const int64_t pf_n = next - off < group ? next - off : group;
      if (into_l1)
        T::template codes<true>(xb + off, group, rcp[j], lo, hi, codes + (g + j) * group,
                                stream_all, xb + nb * group + off, pf_n);
      else
        T::template codes<false>(xb + off, group, rcp[j], lo, hi, codes + (g + j) * group,
                                 stream_all, xb + nb * group + off, pf_n);
    }
  }
  if (stream_all) T::fence();
  return bad;
}

}  // namespace quant
}  // namespace qk
