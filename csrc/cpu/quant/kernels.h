// Internal per-ISA range kernels. Each works on the element range [e0, e1) of a flat array
// whose groups of `group` elements share scale[e / group]; the public entry points in
// entry.cpp split work into ranges and run them on the thread pool.
#pragma once
#include <cmath>
#include <cstdint>
#include <xmmintrin.h>  // _mm_sfence after streaming stores

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

// `stream` (affine kernels, dequantize kernels): the output is too large for the caches; write
// it with streaming stores where whole lines are written.
struct Kernels {
  bool (*affine)(const float* x, int64_t e0, int64_t e1, int64_t group, const float* scale,
                 const int32_t* zp, const AffineSpec& spec, uint8_t* codes, bool stream);
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
                        uint8_t* codes, bool stream);
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
                   const int32_t* zp, const AffineSpec& spec, uint8_t* codes,
                   bool stream = false);
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
                          uint8_t* codes, bool stream = false);
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

// ---- pieces the vector paths (avx2.cpp, avx512.cpp) share --------------------------------

// Calls seg(g, a, b) for each maximal run [a, b) of [e0, e1) inside one group g.
template <typename F>
inline void for_segments(int64_t e0, int64_t e1, int64_t group, F seg) {
  while (e0 < e1) {
    int64_t g = e0 / group;
    int64_t end = (g + 1) * group < e1 ? (g + 1) * group : e1;
    seg(g, e0, end);
    e0 = end;
  }
}

// Groups this long are worth prefetching one ahead (a per-channel row, not a 128-block).
constexpr int64_t kPrefetchGroup = 1024;

inline const float* next_group(const float* x, int64_t g, int64_t g1, int64_t group) {
  return (group >= kPrefetchGroup && g + 1 < g1) ? x + (g + 1) * group : nullptr;
}

// A codebook of at most 16 values searched with nearest-even rounding (the vector paths' case),
// padded to 16 entries with its last value and code.
struct Table16Data {
  static bool eligible(const CodebookSpec& s) { return s.rounding == kNearestEven && s.n <= 16; }
  explicit Table16Data(const CodebookSpec& spec) {
    for (int k = 0; k < 16; ++k) {
      vals[k] = spec.values[k < spec.n ? k : spec.n - 1];
      codes[k] = spec.codes[k < spec.n ? k : spec.n - 1];
    }
  }
  alignas(64) float vals[16];
  alignas(64) int32_t codes[16];
};

// A vector path (avx2.cpp, avx512.cpp) from its pieces, called directly (template arguments,
// not pointers at run time): which affine specs it covers, its segment coder (x[a, b) in group
// g; `pf` is prefetched alongside), its min/max and its 16-value codebook table.
using SegmentFn = bool (*)(const float* x, int64_t a, int64_t b, int64_t g, int64_t group,
                           const float* scale, const int32_t* zp, const AffineSpec& spec,
                           uint8_t* codes, const float* pf, bool stream);

// Codes of whole 64-byte lines only: the range starts on a line and groups fill lines.
inline bool stream_codes(bool stream, const uint8_t* codes, int64_t e0, int64_t group) {
  return stream && (reinterpret_cast<uintptr_t>(codes + e0) & 63) == 0 && group % 64 == 0;
}
using MinMaxFn = void (*)(const float* x, int64_t n, float* lo, float* hi, bool* bad);

template <bool (*kVectorized)(const AffineSpec&), SegmentFn kSegment, MinMaxFn kMinMax,
          class Table>
struct VectorPath {
  static bool affine(const float* x, int64_t e0, int64_t e1, int64_t group, const float* scale,
                     const int32_t* zp, const AffineSpec& spec, uint8_t* codes, bool stream) {
    if (!kVectorized(spec)) return affine_scalar(x, e0, e1, group, scale, zp, spec, codes);
    stream = stream_codes(stream, codes, e0, group);
    bool bad = false;
    for_segments(e0, e1, group, [&](int64_t g, int64_t a, int64_t b) {
      bad |= kSegment(x, a, b, g, group, scale, zp, spec, codes, nullptr, stream);
    });
    if (stream) _mm_sfence();
    return bad;
  }

  static bool codebook(const float* x, int64_t e0, int64_t e1, int64_t group, const float* scale,
                       const CodebookSpec& spec, uint8_t* codes) {
    if (!Table16Data::eligible(spec)) return codebook_scalar(x, e0, e1, group, scale, spec, codes);
    const Table table(spec);
    bool bad = false;
    for_segments(e0, e1, group, [&](int64_t, int64_t a, int64_t b) {
      bad |= table.run(x, a, b, group, scale, spec, codes, nullptr);
    });
    return bad;
  }

  static bool affine_groups(const float* x, int64_t g0, int64_t g1, int64_t group,
                            const AffineSpec& spec, const ScaleSpec& ss, float* scale,
                            int32_t* zp, uint8_t* codes, bool stream) {
    if (!kVectorized(spec))
      return dynamic_groups(x, g0, g1, group, ss, spec, scale, zp, kMinMax, [&](int64_t g) {
        return affine_scalar(x, g * group, (g + 1) * group, group, scale, zp, spec, codes);
      });
    stream = stream_codes(stream, codes, g0 * group, group);
    bool bad = dynamic_groups(x, g0, g1, group, ss, spec, scale, zp, kMinMax, [&](int64_t g) {
      return kSegment(x, g * group, (g + 1) * group, g, group, scale, zp, spec, codes,
                      next_group(x, g, g1, group), stream);
    });
    if (stream) _mm_sfence();  // streaming stores are weakly ordered
    return bad;
  }

  static bool codebook_groups(const float* x, int64_t g0, int64_t g1, int64_t group,
                              const CodebookSpec& spec, const ScaleSpec& ss, float* scale,
                              uint8_t* codes) {
    const AffineSpec none{0, 0, 0, 0, 0.0f, 0};
    if (!Table16Data::eligible(spec))
      return dynamic_groups(x, g0, g1, group, ss, none, scale, nullptr, kMinMax, [&](int64_t g) {
        return codebook_scalar(x, g * group, (g + 1) * group, group, scale, spec, codes);
      });
    const Table table(spec);
    return dynamic_groups(x, g0, g1, group, ss, none, scale, nullptr, kMinMax, [&](int64_t g) {
      return table.run(x, g * group, (g + 1) * group, group, scale, spec, codes,
                       next_group(x, g, g1, group));
    });
  }
};

}  // namespace quant
}  // namespace qk
