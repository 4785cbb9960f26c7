// AVX2 range kernels. Every vector path performs the same float32 operations in the same
// order as the scalar reference (division, not reciprocal multiply; no FMA), so codes are
// identical; modes without a vector path here fall back to the scalar kernels.
#include <immintrin.h>

#include <cfloat>
#include <cmath>

#include "cpu/quant/kernels.h"
#include "cpu/quant/onepass_driver.h"

namespace qk {
namespace quant {
namespace {

inline __m256 round_vec(__m256 v, int mode) {
  switch (mode) {
    case kNearestEven: return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    case kFloor: return _mm256_floor_ps(v);
    case kCeil: return _mm256_ceil_ps(v);
    case kTrunc: return _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    case kAway: {  // ceil(|v|) with v's sign (v >= 0 ? ceil : floor; -0.0 stays -0.0)
      __m256 sign = _mm256_and_ps(v, _mm256_set1_ps(-0.0f));
      return _mm256_or_ps(_mm256_ceil_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), v)), sign);
    }
    case kHalfAway: {
      __m256 r = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      __m256 d = _mm256_sub_ps(v, r);
      __m256 one = _mm256_set1_ps(1.0f);
      r = _mm256_add_ps(r, _mm256_and_ps(_mm256_cmp_ps(d, _mm256_set1_ps(0.5f), _CMP_GE_OQ), one));
      return _mm256_sub_ps(r, _mm256_and_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-0.5f), _CMP_LE_OQ), one));
    }
    default: {  // kHalfUp
      __m256 r = _mm256_floor_ps(v);
      __m256 up = _mm256_cmp_ps(_mm256_sub_ps(v, r), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
      return _mm256_add_ps(r, _mm256_and_ps(up, _mm256_set1_ps(1.0f)));
    }
  }
}

inline __m256 nonfinite_mask(__m256 x) {
  __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  return _mm256_cmp_ps(ax, _mm256_set1_ps(INFINITY), _CMP_NLT_UQ);  // Inf or NaN
}

// Four vectors of int32 codes (low byte significant) -> 32 bytes in element order.
inline void store_bytes32(uint8_t* out, __m256i q0, __m256i q1, __m256i q2, __m256i q3,
                          bool stream = false) {
  const __m256i ff = _mm256_set1_epi32(0xFF);
  __m256i p01 = _mm256_packus_epi32(_mm256_and_si256(q0, ff), _mm256_and_si256(q1, ff));
  __m256i p23 = _mm256_packus_epi32(_mm256_and_si256(q2, ff), _mm256_and_si256(q3, ff));
  __m256i b = _mm256_packus_epi16(p01, p23);
  b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  if (stream) _mm256_stream_si256(reinterpret_cast<__m256i*>(out), b);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), b);
}

// Large float outputs (4x the bytes of their codes) bypass the caches when aligned: streaming
// stores skip the read-for-ownership of lines that are entirely overwritten.
inline void store_f32(float* p, bool stream, __m256 v) {
  if (stream && (reinterpret_cast<uintptr_t>(p) & 31) == 0) _mm256_stream_ps(p, v);
  else _mm256_storeu_ps(p, v);
}

bool affine_vectorized(const AffineSpec& spec) {
  return spec.rounding != kStochastic && spec.shape != kDeadZone;
}

// Codes of x[a, b), all in group g. `pf`, when set, is prefetched alongside (the next group of
// a per-channel row loop, so memory keeps streaming while this group is coded from cache).
__attribute__((always_inline)) inline bool affine_segment(
    const float* x, int64_t a, int64_t b, int64_t g, int64_t group,
                    const float* scale, const int32_t* zp, const AffineSpec& spec,
                    uint8_t* codes, const float* pf, bool stream) {
  const bool midrise = spec.shape == kMidRise;
  const int32_t z = zp ? zp[g] : 0;
  const __m256 vs = _mm256_set1_ps(1.0f / scale[g]);  // x * (1/scale), as torch
  const __m256 lo = _mm256_set1_ps(static_cast<float>(spec.qmin - z));
  const __m256 hi = _mm256_set1_ps(static_cast<float>(spec.qmax - z));
  const __m256i vz = _mm256_set1_epi32(z);
  const __m256 half = _mm256_set1_ps(midrise ? 0.5f : 0.0f);
  __m256 badv = _mm256_setzero_ps();
  auto one = [&](int64_t i) {
    __m256 v = _mm256_loadu_ps(x + i);
    badv = _mm256_or_ps(badv, nonfinite_mask(v));
    __m256 t = _mm256_mul_ps(v, vs);
    if (midrise) t = _mm256_sub_ps(t, half);
    __m256 r = _mm256_min_ps(_mm256_max_ps(round_vec(t, spec.rounding), lo), hi);
    return _mm256_add_epi32(_mm256_cvttps_epi32(r), vz);
  };
  int64_t i = a;
  for (; i + 32 <= b; i += 32) {
    if (pf) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + (i - a)), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pf + (i - a) + 16), _MM_HINT_T0);
    }
    store_bytes32(codes + i, one(i), one(i + 8), one(i + 16), one(i + 24), stream);
  }
  bool bad = _mm256_movemask_ps(badv) != 0;
  if (i < b) bad |= affine_scalar(x, i, b, group, scale, zp, spec, codes);
  return bad;
}

void dequant_affine_avx2(const uint8_t* codes, int64_t e0, int64_t e1, int64_t group,
                         const float* scale, const int32_t* zp, bool is_signed, float offset,
                         float* out, bool stream) {
  for_segments(e0, e1, group, [&](int64_t g, int64_t a, int64_t b) {
    const __m256i vz = _mm256_set1_epi32(zp ? zp[g] : 0);
    const __m256 vs = _mm256_set1_ps(scale[g]);
    const __m256 vo = _mm256_set1_ps(offset);
    int64_t i = a;
    for (; i + 8 <= b; i += 8) {
      __m128i c8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i));
      __m256i c = is_signed ? _mm256_cvtepi8_epi32(c8) : _mm256_cvtepu8_epi32(c8);
      __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(c, vz));
      store_f32(out + i, stream, _mm256_mul_ps(_mm256_add_ps(f, vo), vs));
    }
    if (i < b) dequant_affine_scalar(codes, i, b, group, scale, zp, is_signed, offset, out);
  });
  if (stream) _mm_sfence();  // streaming stores are weakly ordered
}

// Nearest-even codebook search for tables of at most 16 values, vectorized exactly like
// qk::codebook_code: bracket index by counting, then the same two float subtractions. The
// table set-up is done once per call, not per group.
class Table16 {
 public:
  explicit Table16(const CodebookSpec& spec) : n_(spec.n), sign_bit_(spec.sign_bit) {
    const Table16Data t(spec);
    for (int k = 0; k < 16; ++k) bounds_[k] = _mm256_set1_ps(t.vals[k]);
    v_lo8_ = _mm256_load_ps(t.vals);
    v_hi8_ = _mm256_load_ps(t.vals + 8);
    c_lo8_ = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.codes));
    c_hi8_ = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.codes + 8));
  }

  // Codes of x[a, b) with one scale; the tail goes to the scalar kernel.
  bool run(const float* x, int64_t a, int64_t b, int64_t group, const float* scale,
           const CodebookSpec& spec, uint8_t* codes, const float* pf) const {
    const __m256 vs = _mm256_set1_ps(1.0f / scale[a / group]);
    __m256 badv = _mm256_setzero_ps();
    int64_t i = a;
    for (; i + 32 <= b; i += 32) {
      if (pf) {
        _mm_prefetch(reinterpret_cast<const char*>(pf + (i - a)), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(pf + (i - a) + 16), _MM_HINT_T0);
      }
      store_bytes32(codes + i, one(x + i, vs, &badv), one(x + i + 8, vs, &badv),
                    one(x + i + 16, vs, &badv), one(x + i + 24, vs, &badv));
    }
    bool bad = _mm256_movemask_ps(badv) != 0;
    if (i < b) bad |= codebook_scalar(x, i, b, group, scale, spec, codes);
    return bad;
  }

 private:
  __m256 lookup_f(__m256i idx) const {
    __m256 lo = _mm256_permutevar8x32_ps(v_lo8_, idx), hi = _mm256_permutevar8x32_ps(v_hi8_, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7))));
  }
  __m256i lookup_i(__m256i idx) const {
    __m256i lo = _mm256_permutevar8x32_epi32(c_lo8_, idx);
    __m256i hi = _mm256_permutevar8x32_epi32(c_hi8_, idx);
    return _mm256_blendv_epi8(lo, hi, _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
  }

  __m256i one(const float* p, __m256 vs, __m256* badv) const {
    const __m256i one_i = _mm256_set1_epi32(1);
    __m256 v = _mm256_loadu_ps(p);
    *badv = _mm256_or_ps(*badv, nonfinite_mask(v));
    __m256 t = _mm256_mul_ps(v, vs);
    __m256i neg = _mm256_setzero_si256();
    if (sign_bit_) {
      neg = _mm256_srai_epi32(_mm256_castps_si256(t), 31);
      t = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), t);
    }
    __m256i cnt = _mm256_setzero_si256();
    for (int k = 1; k < n_; ++k)
      cnt = _mm256_sub_epi32(cnt, _mm256_castps_si256(_mm256_cmp_ps(bounds_[k], t, _CMP_LE_OQ)));
    __m256i nxt = _mm256_min_epi32(_mm256_add_epi32(cnt, one_i), _mm256_set1_epi32(n_ - 1));
    __m256 dlo = _mm256_sub_ps(t, lookup_f(cnt));
    __m256 dhi = _mm256_sub_ps(lookup_f(nxt), t);
    __m256i clo = lookup_i(cnt), chi = lookup_i(nxt);
    __m256i odd = _mm256_cmpeq_epi32(_mm256_and_si256(clo, one_i), one_i);
    __m256 take_hi = _mm256_or_ps(
        _mm256_cmp_ps(dhi, dlo, _CMP_LT_OQ),
        _mm256_and_ps(_mm256_cmp_ps(dhi, dlo, _CMP_EQ_OQ), _mm256_castsi256_ps(odd)));
    __m256i c = _mm256_blendv_epi8(clo, chi, _mm256_castps_si256(take_hi));
    return _mm256_or_si256(c, _mm256_and_si256(neg, _mm256_set1_epi32(sign_bit_)));
  }

  int n_, sign_bit_;
  __m256 bounds_[16];
  __m256 v_lo8_, v_hi8_;
  __m256i c_lo8_, c_hi8_;
};

// 16-entry tables (4-bit formats) decode with two in-register permutes instead of a gather.
void lut_avx2(const uint8_t* codes, int64_t e0, int64_t e1, int64_t group, const float* scale,
              const float* lut, float* out, bool stream) {
  bool small = true;
  for (int k = 16; k < 256; ++k) small &= lut[k] == 0.0f;
  const __m256 lo8 = _mm256_loadu_ps(lut), hi8 = _mm256_loadu_ps(lut + 8);
  const __m256i seven = _mm256_set1_epi32(7), fifteen = _mm256_set1_epi32(15);
  for_segments(e0, e1, group, [&](int64_t g, int64_t a, int64_t b) {
    const __m256 vs = _mm256_set1_ps(scale[g]);
    int64_t i = a;
    for (; i + 8 <= b; i += 8) {
      __m128i c8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i));
      __m256i idx = _mm256_cvtepu8_epi32(c8);
      __m256 v;
      if (small) {
        __m256 l = _mm256_permutevar8x32_ps(lo8, idx), h = _mm256_permutevar8x32_ps(hi8, idx);
        v = _mm256_blendv_ps(l, h, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven)));
        v = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, fifteen)), v);
      } else {
        v = _mm256_i32gather_ps(lut, idx, 4);
      }
      store_f32(out + i, stream, _mm256_mul_ps(v, vs));
    }
    if (i < b) lut_scalar(codes, i, b, group, scale, lut, out);
  });
  if (stream) _mm_sfence();  // streaming stores are weakly ordered
}

__attribute__((always_inline)) inline void minmax_avx2(const float* x, int64_t n, float* lo,
                                                      float* hi, bool* bad) {
  __m256 mn = _mm256_set1_ps(INFINITY), mx = _mm256_set1_ps(-INFINITY);
  __m256 mn2 = mn, mx2 = mx, badv = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    badv = _mm256_or_ps(badv, _mm256_or_ps(nonfinite_mask(a), nonfinite_mask(b)));
    mn = _mm256_min_ps(a, mn);  // NaN in a leaves mn unchanged, like the scalar loop
    mx = _mm256_max_ps(a, mx);
    mn2 = _mm256_min_ps(b, mn2);
    mx2 = _mm256_max_ps(b, mx2);
  }
  mn = _mm256_min_ps(mn, mn2);
  mx = _mm256_max_ps(mx, mx2);
  __m128 l4 = _mm_min_ps(_mm256_castps256_ps128(mn), _mm256_extractf128_ps(mn, 1));
  __m128 h4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  l4 = _mm_min_ps(l4, _mm_movehl_ps(l4, l4));
  h4 = _mm_max_ps(h4, _mm_movehl_ps(h4, h4));
  l4 = _mm_min_ss(l4, _mm_shuffle_ps(l4, l4, 1));
  h4 = _mm_max_ss(h4, _mm_shuffle_ps(h4, h4, 1));
  float rl = _mm_cvtss_f32(l4), rh = _mm_cvtss_f32(h4);
  bool rb = false;
  if (i < n) {
    float tl, th;
    minmax_scalar(x + i, n - i, &tl, &th, &rb);
    rl = std::fmin(rl, tl);
    rh = std::fmax(rh, th);
  }
  *lo = rl;
  *hi = rh;
  *bad = rb || _mm256_movemask_ps(badv) != 0;
}

using Path = VectorPath<affine_vectorized, affine_segment, minmax_avx2, Table16>;

// ---- dynamic symmetric quantization in one memory pass (onepass_driver.h, 8 lanes) --------
// Groups of a multiple of 32 floats, batches of up to 8 groups.

// Lane-wise max of the bits of |x[0, n)| (n a multiple of 32).
inline __m256i absmax_bits(const float* x, int64_t n) {
  const __m256i m = _mm256_set1_epi32(0x7FFFFFFF);
  auto abs_at = [&](int64_t i) {
    return _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), m);
  };
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < n; i += 32) {
    a0 = _mm256_max_epu32(a0, abs_at(i));
    a1 = _mm256_max_epu32(a1, abs_at(i + 8));
    a2 = _mm256_max_epu32(a2, abs_at(i + 16));
    a3 = _mm256_max_epu32(a3, abs_at(i + 24));
  }
  return _mm256_max_epu32(_mm256_max_epu32(a0, a1), _mm256_max_epu32(a2, a3));
}

// Lane j of the result = the max over the 8 lanes of v[j].
inline __m256i transpose_max8(const __m256i* v) {
  __m256i a[4], b[2];
  for (int k = 0; k < 4; ++k)  // 128-bit lane 0: group 2k, lane 1: group 2k + 1
    a[k] = _mm256_max_epu32(_mm256_permute2x128_si256(v[2 * k], v[2 * k + 1], 0x20),
                            _mm256_permute2x128_si256(v[2 * k], v[2 * k + 1], 0x31));
  for (int k = 0; k < 2; ++k)  // lane L: dwords 0, 1 group 4k + L; 2, 3 group 4k + 2 + L
    b[k] = _mm256_max_epu32(_mm256_unpacklo_epi64(a[2 * k], a[2 * k + 1]),
                            _mm256_unpackhi_epi64(a[2 * k], a[2 * k + 1]));
  const __m256 b0 = _mm256_castsi256_ps(b[0]), b1 = _mm256_castsi256_ps(b[1]);
  __m256i r = _mm256_max_epu32(_mm256_castps_si256(_mm256_shuffle_ps(b0, b1, 0x88)),
                               _mm256_castps_si256(_mm256_shuffle_ps(b0, b1, 0xDD)));
  // dword 4L + j holds group 2j + L
  return _mm256_permutevar8x32_epi32(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// The AVX2 traits of onepass_affine_groups (see onepass_driver.h for the contract).
struct OnePass {
  using Vec = __m256;
  static constexpr int64_t kLanes = 8, kGroupMultiple = 32;
  static Vec splat(float v) { return _mm256_set1_ps(v); }
  static void fence() { _mm_sfence(); }

  __attribute__((always_inline)) static bool batch_scales(const float* xb, int64_t nb,
                                                          int64_t group, float qpos,
                                                          float* scale, int32_t* zp, float* rcp) {
    __m256i acc[8];
    for (int64_t j = 0; j < nb; ++j) acc[j] = absmax_bits(xb + j * group, group);
    for (int64_t j = nb; j < 8; ++j) acc[j] = _mm256_setzero_si256();
    const __m256i m = transpose_max8(acc);
    const __m256i big = _mm256_cmpgt_epi32(m, _mm256_set1_epi32(0x7F7FFFFF));  // NaN / Inf
    if (_mm256_movemask_ps(_mm256_castsi256_ps(big)) & ((1 << nb) - 1)) return false;
    __m256 s = _mm256_div_ps(_mm256_castsi256_ps(m), _mm256_set1_ps(qpos));
    const __m256 pos = _mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_GT_OQ);
    s = _mm256_blendv_ps(_mm256_set1_ps(1.0f), _mm256_max_ps(s, _mm256_set1_ps(FLT_MIN)),
                         pos);  // sanitize_scale
    alignas(32) float sc[8];
    _mm256_store_ps(sc, s);
    _mm256_store_ps(rcp, _mm256_div_ps(_mm256_set1_ps(1.0f), s));
    for (int64_t j = 0; j < nb; ++j) {
      scale[j] = sc[j];
      if (zp) zp[j] = 0;
    }
    return true;
  }

  // One line of pf prefetched into L2 per 256 bytes coded (onepass_driver.h).
  template <bool kClamp>
  static void codes(const float* x, int64_t n, float r, Vec lo, Vec hi, uint8_t* out,
                    bool stream, const float* pf, int64_t pf_n) {
    const __m256 vs = _mm256_set1_ps(r);
    auto code = [&](int64_t i) {
      __m256 t = _mm256_mul_ps(_mm256_loadu_ps(x + i), vs);
      if (kClamp) t = _mm256_min_ps(_mm256_max_ps(t, lo), hi);
      return _mm256_cvttps_epi32(
          _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    };
    for (int64_t i = 0; i < n; i += 32) {
      if (i % 64 == 0 && i < pf_n)
        _mm_prefetch(reinterpret_cast<const char*>(pf + i), _MM_HINT_T1);
      store_bytes32(out + i, code(i), code(i + 8), code(i + 16), code(i + 24), stream);
    }
  }
};

const Kernels kAvx2Kernels = {Path::affine, dequant_affine_avx2, Path::codebook, lut_avx2,
                              minmax_avx2, onepass_affine_groups<OnePass, Path>,
                              Path::codebook_groups};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace quant
}  // namespace qk
