// AVX-512 range kernels (the avx512 level: F/BW/VL/DQ). Every vector path performs the same
// float32 operations in the same order as the scalar reference (x * (1/scale) with the
// reciprocal taken once per group, as scalar.cpp; no FMA), so codes and values are identical
// bit for bit. Tails run the same vector code under a lane mask (masked loads read nothing past
// the end), so no scalar tail loop is needed; stochastic rounding and codebooks of more than 16
// values fall back to the scalar kernels.
// GCC 12's unmasked AVX-512 intrinsics start from _mm512_undefined_*(), which its
// uninitialized-use analysis reports once inlined; the intrinsics' header is exempted.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cfloat>
#include <cmath>

#include "cpu/quant/kernels.h"
#include "cpu/quant/onepass_driver.h"

namespace qk {
namespace quant {
namespace {

constexpr int64_t kW = 16;

inline __mmask16 lanes(int64_t k) {
  return k >= kW ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << k) - 1u);
}

// Inf or NaN lanes (vfpclassps: QNaN | +Inf | -Inf | SNaN).
inline __mmask16 nonfinite(__m512 v) {
  return _mm512_fpclass_ps_mask(v, 0x01 | 0x08 | 0x10 | 0x80);
}

inline __m512 rnd(__m512 v, int imm_mode) {
  switch (imm_mode) {  // the immediate must be a constant: one case per mode
    case 0: return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    case 1: return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    case 2: return _mm512_roundscale_ps(v, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
    default: return _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  }
}

// core/rounding.h round_mode for every deterministic mode.
inline __m512 round_vec(__m512 v, int mode) {
  const __m512 one = _mm512_set1_ps(1.0f);
  switch (mode) {
    case kNearestEven: return rnd(v, 0);
    case kFloor: return rnd(v, 1);
    case kCeil: return rnd(v, 2);
    case kTrunc: return rnd(v, 3);
    case kAway: {  // v >= 0 ? ceil(v) : floor(v)
      __mmask16 ge = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GE_OQ);
      return _mm512_mask_blend_ps(ge, rnd(v, 1), rnd(v, 2));
    }
    case kHalfAway: {
      __m512 r = rnd(v, 3);
      __m512 d = _mm512_sub_ps(v, r);
      __mmask16 up = _mm512_cmp_ps_mask(d, _mm512_set1_ps(0.5f), _CMP_GE_OQ);
      __mmask16 dn = _mm512_cmp_ps_mask(d, _mm512_set1_ps(-0.5f), _CMP_LE_OQ);
      r = _mm512_mask_add_ps(r, up, r, one);
      return _mm512_mask_sub_ps(r, dn, r, one);
    }
    default: {  // kHalfUp
      __m512 r = rnd(v, 1);
      __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(v, r), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
      return _mm512_mask_add_ps(r, up, r, one);
    }
  }
}

// Large float outputs bypass the caches (as avx2.cpp): streaming stores of whole aligned lines.
inline void store_f32(float* p, bool stream, __m512 v) {
  if (stream) _mm512_stream_ps(p, v);
  else _mm512_storeu_ps(p, v);
}

bool affine_vectorized(const AffineSpec& spec) { return spec.rounding != kStochastic; }

// core/affine.h affine_code on 16 values t = x * (1/scale): the quantizer shape, the clamp
// (NaN -> lo, as clampf) and the integer code with the zero point.
struct AffineVec {
  int shape, rounding;
  __m512 lo, hi, half, dz;
  __m512i z;
  AffineVec(const AffineSpec& s, int32_t zp)
      : shape(s.shape), rounding(s.rounding),
        lo(_mm512_set1_ps(static_cast<float>(s.qmin - zp))),
        hi(_mm512_set1_ps(static_cast<float>(s.qmax - zp))),
        half(_mm512_set1_ps(0.5f)), dz(_mm512_set1_ps(s.deadzone_half)), z(_mm512_set1_epi32(zp)) {}

  __m512i code(__m512 t) const {
    if (shape == kMidTread && rounding == kNearestEven) {  // integer bounds: clamp, then round
      t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);          // (max(NaN, lo) = lo)
      return _mm512_add_epi32(
          _mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), z);
    }
    __m512 q;
    if (shape == kMidRise) {
      q = round_vec(_mm512_sub_ps(t, half), rounding);
    } else if (shape == kDeadZone) {
      const __m512 sign = _mm512_set1_ps(-0.0f);
      __m512 a = _mm512_sub_ps(_mm512_andnot_ps(sign, t), dz);
      __m512 r = _mm512_max_ps(round_vec(a, rounding), _mm512_setzero_ps());  // NaN -> 0
      __mmask16 neg = _mm512_cmp_ps_mask(t, _mm512_setzero_ps(), _CMP_LT_OQ);
      q = _mm512_mask_xor_ps(r, neg, r, sign);
    } else {
      q = round_vec(t, rounding);
    }
    q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);  // max(NaN, lo) = lo
    return _mm512_add_epi32(_mm512_cvttps_epi32(q), z);
  }
};

// Codes of x[a, b), all in group g; `pf` (when set) is prefetched alongside: the next group
// of a per-channel row loop, so memory keeps streaming while this group is coded from cache.
__attribute__((always_inline)) inline bool affine_segment(
    const float* x, int64_t a, int64_t b, int64_t g, int64_t /*group*/, const float* scale,
    const int32_t* zp, const AffineSpec& spec, uint8_t* codes, const float* pf, bool stream) {
  const AffineVec av(spec, zp ? zp[g] : 0);
  const __m512 vs = _mm512_set1_ps(1.0f / scale[g]);
  __mmask16 bad = 0;
  int64_t i = a;
  for (; i + 4 * kW <= b; i += 4 * kW) {
    if (pf) {
      for (int k = 0; k < 4; ++k)
        _mm_prefetch(reinterpret_cast<const char*>(pf + (i - a) + k * kW), _MM_HINT_T0);
    }
    __m512i q[4];
    for (int k = 0; k < 4; ++k) {
      __m512 v = _mm512_loadu_ps(x + i + k * kW);
      bad |= nonfinite(v);
      q[k] = av.code(_mm512_mul_ps(v, vs));
    }
    __m128i b0 = _mm512_cvtepi32_epi8(q[0]), b1 = _mm512_cvtepi32_epi8(q[1]);
    __m128i b2 = _mm512_cvtepi32_epi8(q[2]), b3 = _mm512_cvtepi32_epi8(q[3]);
    __m512i all = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_set_m128i(b1, b0)), _mm256_set_m128i(b3, b2), 1);
    if (stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(codes + i), all);
    else _mm512_storeu_si512(codes + i, all);
  }
  for (; i < b; i += kW) {
    __mmask16 m = lanes(b - i);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    bad |= nonfinite(v);
    _mm512_mask_cvtepi32_storeu_epi8(codes + i, m, av.code(_mm512_mul_ps(v, vs)));
  }
  return bad != 0;
}

// 16 codes at p (bytes, masked) as int32.
inline __m512i load_codes(const uint8_t* p, __mmask16 m, bool is_signed) {
  __m128i c8 = _mm_maskz_loadu_epi8(m, p);
  return is_signed ? _mm512_cvtepi8_epi32(c8) : _mm512_cvtepu8_epi32(c8);
}

// out[a, b) = f(16 codes, 16 lanes mask): full vectors, then one masked tail. `stream`: the
// vectors go out with streaming stores (whole lines; see stream_ok).
template <typename F>
inline void decode_range(const uint8_t* codes, int64_t a, int64_t b, float* out, bool stream,
                         F f) {
  int64_t i = a;
  const auto all = static_cast<__mmask16>(0xFFFF);
  for (; i + kW <= b; i += kW) store_f32(out + i, stream, f(codes + i, all));
  if (i < b) {
    __mmask16 m = lanes(b - i);
    _mm512_mask_storeu_ps(out + i, m, f(codes + i, m));
  }
}

// Streaming stores only where every segment [a, b) of the range starts on a 64-byte line and
// fills whole lines (a partial line stored normally beside streamed ones costs more than the
// streaming saves): the range starts line-aligned and groups are multiples of 16 floats.
inline bool stream_ok(bool stream, const float* out, int64_t e0, int64_t group) {
  return stream && (reinterpret_cast<uintptr_t>(out + e0) & 63) == 0 && group % kW == 0;
}

void dequant_affine_avx512(const uint8_t* codes, int64_t e0, int64_t e1, int64_t group,
                           const float* scale, const int32_t* zp, bool is_signed, float offset,
                           float* out, bool stream) {
  stream = stream_ok(stream, out, e0, group);
  const __m512 vo = _mm512_set1_ps(offset);
  for_segments(e0, e1, group, [&](int64_t g, int64_t a, int64_t b) {
    const __m512i vz = _mm512_set1_epi32(zp ? zp[g] : 0);
    const __m512 vs = _mm512_set1_ps(scale[g]);
    decode_range(codes, a, b, out, stream, [&](const uint8_t* p, __mmask16 m) {
      __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(load_codes(p, m, is_signed), vz));
      return _mm512_mul_ps(_mm512_add_ps(f, vo), vs);  // (float(c - zp) + offset) * scale
    });
  });
  if (stream) _mm_sfence();  // streaming stores are weakly ordered
}

// Nearest-even codebook search for tables of at most 16 values, exactly like
// qk::codebook_code: the bracket index (the last value <= t, among entries 1..n-1) by a 4-step
// binary search over the 16-entry table in one register (vpermps), then the same two float
// subtractions and the tie rule. The table is padded with its last value, so the search never
// passes n - 1 unless t >= the last value, where the clamp gives n - 1 as the count would.
class Table16 {
 public:
  explicit Table16(const CodebookSpec& spec) : n_(spec.n), sign_bit_(spec.sign_bit) {
    const Table16Data t(spec);
    vals_ = _mm512_load_ps(t.vals);
    cods_ = _mm512_load_si512(t.codes);
  }

  // Codes of x[a, b) with one scale.
  bool run(const float* x, int64_t a, int64_t b, int64_t group, const float* scale,
           const CodebookSpec&, uint8_t* codes, const float* pf) const {
    const __m512 vs = _mm512_set1_ps(1.0f / scale[a / group]);
    __mmask16 bad = 0;
    for (int64_t i = a; i < b; i += kW) {
      if (pf && ((i - a) & 63) == 0) {
        for (int k = 0; k < 4; ++k)
          _mm_prefetch(reinterpret_cast<const char*>(pf + (i - a) + k * kW), _MM_HINT_T0);
      }
      __mmask16 m = lanes(b - i);
      __m512 v = _mm512_maskz_loadu_ps(m, x + i);
      bad |= nonfinite(v);
      _mm512_mask_cvtepi32_storeu_epi8(codes + i, m, one(_mm512_mul_ps(v, vs)));
    }
    return bad != 0;
  }

 private:
  __m512i one(__m512 t) const {
    const __m512i one_i = _mm512_set1_epi32(1);
    __mmask16 neg = 0;
    if (sign_bit_) {
      neg = _mm512_movepi32_mask(_mm512_castps_si512(t));  // sign bit set (-0.0 included)
      t = _mm512_andnot_ps(_mm512_set1_ps(-0.0f), t);
    }
    __m512i cnt = _mm512_setzero_si512();
    for (int step = 8; step > 0; step >>= 1) {
      __m512i cand = _mm512_add_epi32(cnt, _mm512_set1_epi32(step));
      __mmask16 le = _mm512_cmp_ps_mask(_mm512_permutexvar_ps(cand, vals_), t, _CMP_LE_OQ);
      cnt = _mm512_mask_mov_epi32(cnt, le, cand);
    }
    const __m512i last = _mm512_set1_epi32(n_ - 1);
    cnt = _mm512_min_epi32(cnt, last);
    __m512i nxt = _mm512_min_epi32(_mm512_add_epi32(cnt, one_i), last);
    __m512 dlo = _mm512_sub_ps(t, _mm512_permutexvar_ps(cnt, vals_));
    __m512 dhi = _mm512_sub_ps(_mm512_permutexvar_ps(nxt, vals_), t);
    __m512i clo = _mm512_permutexvar_epi32(cnt, cods_), chi = _mm512_permutexvar_epi32(nxt, cods_);
    __mmask16 odd = _mm512_test_epi32_mask(clo, one_i);
    __mmask16 take_hi = _mm512_cmp_ps_mask(dhi, dlo, _CMP_LT_OQ) |
                        (_mm512_cmp_ps_mask(dhi, dlo, _CMP_EQ_OQ) & odd);
    __m512i c = _mm512_mask_blend_epi32(take_hi, clo, chi);
    return _mm512_mask_or_epi32(c, neg, c, _mm512_set1_epi32(sign_bit_));
  }

  int n_, sign_bit_;
  __m512 vals_;
  __m512i cods_;
};

// 16-entry tables (4-bit formats) decode with one in-register permute; larger ones gather.
void lut_avx512(const uint8_t* codes, int64_t e0, int64_t e1, int64_t group, const float* scale,
                const float* lut, float* out, bool stream) {
  bool small = true;
  for (int k = 16; k < 256; ++k) small &= lut[k] == 0.0f;
  stream = stream_ok(stream, out, e0, group);
  const __m512 t16 = _mm512_loadu_ps(lut);
  const __m512i fifteen = _mm512_set1_epi32(15);
  for_segments(e0, e1, group, [&](int64_t g, int64_t a, int64_t b) {
    const __m512 vs = _mm512_set1_ps(scale[g]);
    if (small) {  // two loops, not a select: the gather would be computed either way
      decode_range(codes, a, b, out, stream, [&](const uint8_t* p, __mmask16 m) {
        __m512i idx = load_codes(p, m, false);
        __mmask16 in = _mm512_cmple_epu32_mask(idx, fifteen);
        return _mm512_mul_ps(_mm512_maskz_permutexvar_ps(in, idx, t16), vs);
      });
    } else {
      decode_range(codes, a, b, out, stream, [&](const uint8_t* p, __mmask16 m) {
        __m512i idx = load_codes(p, m, false);
        return _mm512_mul_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, lut, 4), vs);
      });
    }
  });
  if (stream) _mm_sfence();
}

// min, max (NaN lanes skipped: min(v, acc) keeps acc for NaN v, as the scalar loop) and the
// NaN/Inf flag; two accumulators, the tail under a mask.
__attribute__((always_inline)) inline void minmax_avx512(const float* x, int64_t n, float* lo,
                                                        float* hi, bool* bad) {
  __m512 mn = _mm512_set1_ps(INFINITY), mx = _mm512_set1_ps(-INFINITY);
  __m512 mn2 = mn, mx2 = mx;
  __mmask16 b = 0;
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    __m512 u = _mm512_loadu_ps(x + i), v = _mm512_loadu_ps(x + i + kW);
    b |= nonfinite(u) | nonfinite(v);
    mn = _mm512_min_ps(u, mn);
    mx = _mm512_max_ps(u, mx);
    mn2 = _mm512_min_ps(v, mn2);
    mx2 = _mm512_max_ps(v, mx2);
  }
  for (; i < n; i += kW) {
    __mmask16 m = lanes(n - i);
    __m512 u = _mm512_maskz_loadu_ps(m, x + i);
    b |= nonfinite(u);
    mn = _mm512_mask_min_ps(mn, m, u, mn);
    mx = _mm512_mask_max_ps(mx, m, u, mx);
  }
  *lo = _mm512_reduce_min_ps(_mm512_min_ps(mn, mn2));
  *hi = _mm512_reduce_max_ps(_mm512_max_ps(mx, mx2));
  *bad = b != 0;
}

using Path = VectorPath<affine_vectorized, affine_segment, minmax_avx512, Table16>;

// ---- dynamic symmetric quantization in one memory pass (onepass_driver.h, 16 lanes) -------
// Groups of a multiple of 16 floats, batches of up to 16 groups.

// Lane-wise max of the bits of |x[0, n)| (n a multiple of 16).
inline __m512i absmax_bits(const float* x, int64_t n) {
  const __m512i m = _mm512_set1_epi32(0x7FFFFFFF);
  auto abs_at = [&](int64_t i) { return _mm512_and_si512(_mm512_loadu_si512(x + i), m); };
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    a0 = _mm512_max_epu32(a0, abs_at(i));
    a1 = _mm512_max_epu32(a1, abs_at(i + kW));
    a2 = _mm512_max_epu32(a2, abs_at(i + 2 * kW));
    a3 = _mm512_max_epu32(a3, abs_at(i + 3 * kW));
  }
  for (; i < n; i += kW) a0 = _mm512_max_epu32(a0, abs_at(i));
  return _mm512_max_epu32(_mm512_max_epu32(a0, a1), _mm512_max_epu32(a2, a3));
}

// Lane j of the result = the max over the 16 lanes of v[j] (a transpose and reduce in 15 steps).
inline __m512i transpose_max16(const __m512i* v) {
  __m512i a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k)  // 128-bit lanes 0, 1: group 2k; 2, 3: group 2k + 1
    a[k] = _mm512_max_epu32(_mm512_shuffle_i32x4(v[2 * k], v[2 * k + 1], 0x44),
                            _mm512_shuffle_i32x4(v[2 * k], v[2 * k + 1], 0xEE));
  for (int k = 0; k < 4; ++k)  // lane L: group 4k + L
    b[k] = _mm512_max_epu32(_mm512_shuffle_i32x4(a[2 * k], a[2 * k + 1], 0x88),
                            _mm512_shuffle_i32x4(a[2 * k], a[2 * k + 1], 0xDD));
  for (int k = 0; k < 2; ++k)  // lane L: dwords 0, 1 group 8k + L; 2, 3 group 8k + 4 + L
    c[k] = _mm512_max_epu32(_mm512_unpacklo_epi64(b[2 * k], b[2 * k + 1]),
                            _mm512_unpackhi_epi64(b[2 * k], b[2 * k + 1]));
  const __m512 c0 = _mm512_castsi512_ps(c[0]), c1 = _mm512_castsi512_ps(c[1]);
  __m512i r = _mm512_max_epu32(_mm512_castps_si512(_mm512_shuffle_ps(c0, c1, 0x88)),
                               _mm512_castps_si512(_mm512_shuffle_ps(c0, c1, 0xDD)));
  // dword 4L + j holds group 4j + L
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_epi32(idx, r);
}

// The AVX-512 traits of onepass_affine_groups (see onepass_driver.h for the contract).
struct OnePass {
  using Vec = __m512;
  static constexpr int64_t kLanes = kW, kGroupMultiple = kW;
  static Vec splat(float v) { return _mm512_set1_ps(v); }
  static void fence() { _mm_sfence(); }

  __attribute__((always_inline)) static bool batch_scales(const float* xb, int64_t nb,
                                                          int64_t group, float qpos,
                                                          float* scale, int32_t* zp, float* rcp) {
    __m512i acc[16];
    for (int64_t j = 0; j < nb; ++j) acc[j] = absmax_bits(xb + j * group, group);
    __m512i m;
    if (nb == 1) {
      m = _mm512_set1_epi32(static_cast<int>(_mm512_reduce_max_epu32(acc[0])));
    } else {
      for (int64_t j = nb; j < 16; ++j) acc[j] = _mm512_setzero_si512();
      m = transpose_max16(acc);
    }
    const __mmask16 valid = lanes(nb);
    if (_mm512_mask_cmpge_epu32_mask(valid, m, _mm512_set1_epi32(0x7F800000)))
      return false;  // NaN / Inf
    __m512 s = _mm512_div_ps(_mm512_castsi512_ps(m), _mm512_set1_ps(qpos));
    const __mmask16 pos = _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_GT_OQ);
    s = _mm512_mask_blend_ps(pos, _mm512_set1_ps(1.0f),  // sanitize_scale
                             _mm512_max_ps(s, _mm512_set1_ps(FLT_MIN)));
    _mm512_mask_storeu_ps(scale, valid, s);
    if (zp) _mm512_mask_storeu_epi32(zp, valid, _mm512_setzero_si512());
    _mm512_store_ps(rcp, _mm512_div_ps(_mm512_set1_ps(1.0f), s));
    return true;
  }

  // One line of pf prefetched into L2 per 256 bytes coded (onepass_driver.h).
  template <bool kClamp>
  static void codes(const float* x, int64_t n, float r, Vec lo, Vec hi, uint8_t* out,
                    bool stream, const float* pf, int64_t pf_n) {
    const __m512 vs = _mm512_set1_ps(r);
    auto code = [&](int64_t i) {
      __m512 t = _mm512_mul_ps(_mm512_loadu_ps(x + i), vs);
      if (kClamp) t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);  // clamp-then-round is exact
      return _mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    };
    // saturating packs keep the bytes (codes are in [-128, 127]); the permute fixes the order
    const __m512i order =
        _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    int64_t i = 0;
    for (; i + 4 * kW <= n; i += 4 * kW) {
      if (i < pf_n) _mm_prefetch(reinterpret_cast<const char*>(pf + i), _MM_HINT_T1);
      __m512i p01 = _mm512_packs_epi32(code(i), code(i + kW));
      __m512i p23 = _mm512_packs_epi32(code(i + 2 * kW), code(i + 3 * kW));
      __m512i b = _mm512_permutexvar_epi32(order, _mm512_packs_epi16(p01, p23));
      if (stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(out + i), b);
      else _mm512_storeu_si512(out + i, b);
    }
    for (; i < n; i += kW)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(code(i)));
  }
};

const Kernels kAvx512Kernels = {Path::affine, dequant_affine_avx512, Path::codebook, lut_avx512,
                                minmax_avx512, onepass_affine_groups<OnePass, Path>,
                                Path::codebook_groups};

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace quant
}  // namespace qk
