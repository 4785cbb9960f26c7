// The AVX-512 VQ kernels: register-blocked assignment (12 rows x one 16-centroid panel), the
// ADC table 16 sub-centroids at a time, the ADC scan of tables of <= 16 entries by lane
// permutations, 16 codes at a time (larger ones: the scalar loop). Same float operations as
// scalar.cpp (kernels.h).
#include <immintrin.h>

#include <algorithm>
#include <climits>

#include "cpu/runtime/simd_f32.h"
#include "cpu/vq/kernels.h"

namespace qk {
namespace vq {
namespace {

struct Avx512 : simd::F32x16 {
  using I = __m512i;
  static constexpr int kRows = 12;  // 12 accumulators, 32 registers
  static I lanes() {
    return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  static I seq(int64_t base) {
    return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(base)), lanes());
  }
  static __mmask16 lt(T a, T b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static __mmask16 le(T a, T b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
  static uint32_t bits(__mmask16 m) { return static_cast<uint32_t>(m); }
  static T blend(__mmask16 m, T a, T b) { return _mm512_mask_blend_ps(m, a, b); }
  static I blendi(__mmask16 m, I a, I b) { return _mm512_mask_blend_epi32(m, a, b); }
  static void storei(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
  static I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  // row[ix] for ksub <= 16 entries (a masked load, the rest zero).
  static T lookup(const float* row, int64_t ksub, I ix) {
    const T r = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << ksub) - 1), row);
    return _mm512_mask_permutexvar_ps(r, 0xFFFF, ix, r);
  }
  // (a, b) = the lexicographic minimum of (a, b) and (c, d), lane by lane.
  // The lanes where (a, b) comes before (c, d): ascending values, equal values by index.
  static __mmask16 before(T a, I b, T c, I d) {
    const __mmask16 eq = _mm512_cmp_ps_mask(a, c, _CMP_EQ_OQ);
    return _mm512_cmp_ps_mask(a, c, _CMP_LT_OQ) | _mm512_mask_cmplt_epi32_mask(eq, b, d);
  }
  static void pick(T& a, I& b, T c, I d) {
    const __mmask16 take = before(c, d, a, b);
    a = _mm512_mask_blend_ps(take, a, c);
    b = _mm512_mask_blend_epi32(take, b, d);
  }
  // Every lane of (a, b) the minimum over all lanes: pick across 8, 4, 2, 1 lanes.
  static void butterfly(T& a, I& b) {
    constexpr __mmask16 kAll = 0xFFFF;  // the masked forms: GCC 12 warns on the plain ones
    pick(a, b, _mm512_maskz_shuffle_f32x4(kAll, a, a, 0x4E),
         _mm512_maskz_shuffle_i32x4(kAll, b, b, 0x4E));
    pick(a, b, _mm512_maskz_shuffle_f32x4(kAll, a, a, 0xB1),
         _mm512_maskz_shuffle_i32x4(kAll, b, b, 0xB1));
    pick(a, b, _mm512_maskz_shuffle_ps(kAll, a, a, 0x4E),
         _mm512_maskz_shuffle_epi32(kAll, b, _MM_PERM_BADC));
    pick(a, b, _mm512_maskz_shuffle_ps(kAll, a, a, 0xB1),
         _mm512_maskz_shuffle_epi32(kAll, b, _MM_PERM_CDAB));
  }
};

// Kernels::beam_offer with a list of at most 16 entries held in registers (values in one zmm,
// entries as int32 in another) instead of topk_offer's insertion loop, whose branches on the
// data mispredict: the list's entries before an offer are a prefix (a compare mask), the offer
// goes in after them and the rest move one lane up (blends of the list and the list shifted
// by one lane; an offer that does not enter lands at lane kk or later, outside the list). The
// same list as beam_offer_simd, so the same codes. Longer lists, or entries past int32, take
// beam_offer_simd.
void beam_offer_reg(const float* s, int64_t k, const float* t, float db, int64_t base,
                    float* v, int64_t* idx, int64_t kk) {
  bool narrow = kk <= 16 && base + k <= INT32_MAX;
  for (int64_t e = 0; e < kk && narrow; ++e) narrow = idx[e] <= INT32_MAX;
  if (!narrow) return beam_offer_simd<Avx512>(s, k, t, db, base, v, idx, kk);
  const __mmask16 in = static_cast<__mmask16>((1u << kk) - 1);
  alignas(64) int32_t ent[16] = {};
  for (int64_t e = 0; e < kk; ++e) ent[e] = static_cast<int32_t>(idx[e]);
  __m512 lv = _mm512_mask_loadu_ps(_mm512_set1_ps(__builtin_inff()), in, v);
  __m512i li = _mm512_load_si512(ent);
  const __m512i last = _mm512_set1_epi32(static_cast<int32_t>(kk - 1));
  const __m512 two = _mm512_set1_ps(2.0f), vdb = _mm512_set1_ps(db);
  auto thr = [&] { return _mm512_maskz_permutexvar_ps(0xFFFF, last, lv); };  // lv[kk - 1]
  alignas(64) float val[64];
  auto offer = [&](uint64_t live, int64_t c) {
    for (; live; live &= live - 1) {
      const int l = __builtin_ctzll(live);
      const __m512 x = _mm512_set1_ps(val[l]);
      const __m512i j = _mm512_set1_epi32(static_cast<int32_t>(base + c + l));
      // lanes before the offer stay, the offer's lane (the first not before) takes it, the
      // rest take their left neighbour (valignd: lane 0 the offer, lane i the old i - 1, so a
      // new best needs no lane marked); all in mask registers, so the chain to the next offer
      // is a compare and two blends
      const __mmask16 stay = Avx512::before(lv, li, x, j) & in;
      const __mmask16 at = _kandn_mask16(stay, _kshiftli_mask16(stay, 1));
      const __m512 sv = _mm512_castsi512_ps(
          _mm512_maskz_alignr_epi32(0xFFFF, _mm512_castps_si512(lv), _mm512_castps_si512(x), 15));
      const __m512i si = _mm512_maskz_alignr_epi32(0xFFFF, li, j, 15);
      lv = _mm512_mask_blend_ps(stay, _mm512_mask_blend_ps(at, sv, x), lv);
      li = _mm512_mask_blend_epi32(stay, _mm512_mask_blend_epi32(at, si, j), li);
    }
  };
  int64_t c = 0;
  for (; c + 64 <= k; c += 64) {  // 4 vectors per step, as beam_offer_simd
    const __m512 lim = thr();
    uint64_t live = 0;
    for (int w = 0; w < 4; ++w) {
      const int64_t o = c + 16 * w;
      const __m512 x = _mm512_add_ps(_mm512_add_ps(vdb, _mm512_loadu_ps(t + o)),
                                     _mm512_mul_ps(two, _mm512_loadu_ps(s + o)));
      _mm512_store_ps(val + 16 * w, x);
      live |= uint64_t{_mm512_cmp_ps_mask(x, lim, _CMP_LE_OQ)} << (16 * w);
    }
    offer(live, c);
  }
  for (; c < k; c += 16) {  // the tail, 16 lanes at a time (masked)
    const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, k - c)) - 1);
    const __m512 x = _mm512_add_ps(_mm512_add_ps(vdb, _mm512_maskz_loadu_ps(m, t + c)),
                                   _mm512_mul_ps(two, _mm512_maskz_loadu_ps(m, s + c)));
    _mm512_store_ps(val, x);
    offer(_mm512_mask_cmp_ps_mask(m, x, thr(), _CMP_LE_OQ), c);
  }
  _mm512_mask_storeu_ps(v, in, lv);
  _mm512_store_si512(ent, li);
  for (int64_t e = 0; e < kk; ++e) idx[e] = ent[e];
}

constexpr Kernels with_reg_list(Kernels t) {
  t.beam_offer = beam_offer_reg;
  return t;
}

// Constant-initialized (no code runs at load: this file's code needs AVX-512).
constexpr Kernels kAvx512Kernels = with_reg_list(simd_kernels<Avx512>());

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace vq
}  // namespace qk
