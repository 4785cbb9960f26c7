// The batch driver of the one-pass dynamic symmetric quantizer, shared by avx2.cpp and
// avx512.cpp (the Kernels::affine_groups entry of both). The common case (absmax scale,
// mid-tread, nearest-even, signed codes of at most 8 bits, groups of a multiple of the ISA's
// block) runs in batches of up to one vector's lanes of groups that fit in L1 (<= 8 KiB, or one
// group of a per-channel row): the ISA takes the maxima of |x| on the integer bits (|x| bits
// order like the floats, and NaN / Inf bits lie above every finite value), reduces the batch by
// one transpose and derives its scales and reciprocals in one vector division each; then the
// batch's codes are written from L1 while the input kPrefetchAhead bytes ahead is prefetched
// into L2, one line in four (the hardware prefetcher brings the rest). The float operations
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
//   template <bool kClamp> static void codes(const float* x, int64_t n, float r, Vec lo,
//                                            Vec hi, uint8_t* out, bool stream,
//                                            const float* pf, int64_t pf_n);
//       the codes of one group x[0, n) with reciprocal scale r (t clamped to [lo, hi] before
//       rounding when kClamp), prefetching one line of every 256 bytes of pf[0, pf_n) into L2
//   static void fence();                            after streaming stores
// and `Path` is the file's VectorPath (the general path).
#pragma once
#include <cstdint>

#include "cpu/quant/kernels.h"

namespace qk {
namespace quant {

// How far ahead of the group being coded the input is prefetched. One thread, 4096 x 4096
// per-channel int8, cold, 2 MiB pages (a scratch copy of this loop): no prefetch 3.07 ms; every
// line of the next 16 KiB row into L2 (this driver's former policy) 3.50; one line per 256 bytes
// 32 KiB ahead into L2 2.58 (16-64 KiB, one line per 128-512 bytes: 2.5-2.8; into L1: 3.6-4.3;
// a read-only pass 2.0).
constexpr int64_t kPrefetchAhead = 32768;

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
  const typename T::Vec lo = T::splat(static_cast<float>(spec.qmin));
  const typename T::Vec hi = T::splat(static_cast<float>(spec.qmax));
  const int64_t end = g1 * group;  // prefetches stay inside the range
  // |x| <= amax, so t = x * (1 / (amax / qpos)) is within qpos (1 + 4 * 2^-24) < qpos + 1/2 of
  // zero (three roundings; scales below FLT_MIN only shrink it): with an integral qpos inside
  // the code range, rounding alone lands in range and the clamp changes no code (it is a
  // quarter of the codes pass's arithmetic). qkern's formats pass qpos = qmax.
  const float qp = ss.qpos;
  const bool integral =
      qp >= 1.0f && qp <= 127.0f && static_cast<float>(static_cast<int>(qp)) == qp;
  const bool clamp = !(integral && qp <= static_cast<float>(spec.qmax) &&
                       -qp >= static_cast<float>(spec.qmin));
  alignas(64) float rcp[T::kLanes];
  bool bad = false;
  for (int64_t g = g0; g < g1; g += per) {
    const int64_t nb = per < g1 - g ? per : g1 - g;
    const float* xb = x + g * group;
    if (!T::batch_scales(xb, nb, group, ss.qpos, scale + g, zp ? zp + g : nullptr, rcp)) {
      bad |= Path::affine_groups(x, g, g + nb, group, spec, ss, scale, zp, codes, stream_all);
      continue;
    }
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t at = (g + j) * group, ahead = at + kPrefetchAhead / 4;
      const int64_t pf_n = ahead < end ? (end - ahead < group ? end - ahead : group) : 0;
      const float* pf = x + (pf_n ? ahead : at);
      if (clamp)
        T::template codes<true>(x + at, group, rcp[j], lo, hi, codes + at, stream_all, pf, pf_n);
      else
        T::template codes<false>(x + at, group, rcp[j], lo, hi, codes + at, stream_all, pf, pf_n);
    }
  }
  if (stream_all) T::fence();
  return bad;
}

}  // namespace quant
}  // namespace qk
