// AVX2 gemm_vq8 (api.h): each group of 16 rows x 4 vectors is decoded into bytes from the
// codebook planes (scalar look-ups; from kPanelRows rows of x once per block, before the
// rows' loop), then multiplied by the broadcast activation word with
// the sign trick (maddubs(|x|, sign(w, x)): pairs <= 2 * 127 * 127, no saturation) and
// madd into int32 lanes, one per row: the exact dot products of api.h. For 1-3 rows of x and
// codebooks past 16 entries the call goes to dots_avx2.cpp instead (no decode at all).
#include <immintrin.h>

#include "cpu/gemm/vq8/kernels.h"
#include "cpu/runtime/aligned.h"

namespace qk {
namespace vq8 {
namespace {

inline __m256i dot4(__m256i acc, __m256i w, __m256i x) {
  const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(w, x));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

// Code group q of block `codes` decoded from the planes into w[d * 64 + 4 l + t] (16 rows l x
// 4 vectors t per plane d); the largest code so far in top.
inline void decode_group(const Problem& p, const uint8_t* codes, const int8_t* tab, int64_t q,
                         int8_t* w, uint32_t& top) {
  for (int64_t j = 0; j < 64; ++j) {
    const uint32_t c = code_at(p, codes, q, j / kVq8Group, j % kVq8Group);
    top = c > top ? c : top;
    for (int64_t d = 0; d < p.dim; ++d) w[d * 64 + j] = tab[d * 256 + c];
  }
}

// The largest byte of c0 and c1.
inline uint32_t max_byte(__m256i c0, __m256i c1) {
  const __m256i v = _mm256_max_epu8(c0, c1);
  __m128i m = _mm_max_epu8(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 8));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 4));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 2));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m)) & 0xffu;
}

// decode_group for codebooks of <= 16 entries: the group's 64 codes are 64 consecutive bytes
// (or nibbles) in j order, so each plane is one vpshufb of its first 16 table bytes per 32
// codes (the same bytes as the scalar look-ups; a code >= 16 can only be out of range, which
// `top` reports and the entry point raises on).
inline void decode_group16(const Problem& p, const uint8_t* codes, const int8_t* tab, int64_t q,
                           int8_t* w, uint32_t& top) {
  const uint8_t* src = codes + (p.nib ? q / 2 : q) * kVq8Rows * kVq8Group;
  __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32));
  if (p.nib) {
    const __m256i m15 = _mm256_set1_epi8(15);
    const int sh = q % 2 ? 4 : 0;
    c0 = _mm256_and_si256(_mm256_srli_epi16(c0, sh), m15);
    c1 = _mm256_and_si256(_mm256_srli_epi16(c1, sh), m15);
  }
  const uint32_t mx = max_byte(c0, c1);
  top = mx > top ? mx : top;
  for (int64_t d = 0; d < p.dim; ++d) {
    const __m256i t = _mm256_broadcastsi128_si256(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(tab + d * 256)));
    auto* wd = reinterpret_cast<__m256i*>(w + d * 64);
    _mm256_store_si256(wd, _mm256_shuffle_epi8(t, c0));
    _mm256_store_si256(wd + 1, _mm256_shuffle_epi8(t, c1));
  }
}

// From this many rows of x the block is decoded once (16 nv dim bytes) before the rows'
// loop; below it each row decodes its groups as it goes (no panel to write and read back).
constexpr int64_t kPanelRows = 4;

uint32_t block_avx2(const Problem& p, int64_t b, const int8_t* tab, float* out) {
  const int64_t nq = p.nv / kVq8Group, dim = p.dim, qpb = 8 / dim;
  const uint8_t* codes = p.packed4 + b * block_bytes(p);
  const bool whole = p.m >= kPanelRows;
  thread_local AlignedVector<int8_t> panel;
  alignas(32) int8_t group[8 * 64];  // one decoded group, plane by plane (rows decoding it)
  alignas(32) float s[kVq8Rows];
  uint32_t top = 0;
  const auto decode = p.kc <= 16 ? decode_group16 : decode_group;
  if (whole) {
    panel.resize(static_cast<size_t>(nq * dim * 64));
    for (int64_t q = 0; q < nq; ++q) decode(p, codes, tab, q, panel.data() + q * dim * 64, top);
  }
  for (int64_t i = 0; i < p.m; ++i) {
    const uint32_t* xp = p.xp + i * nq * dim;
    __m256 y0 = _mm256_setzero_ps(), y1 = _mm256_setzero_ps();
    int64_t seg = -1;
    for (int64_t blk = 0, q = 0; blk < p.nblk; ++blk) {
      __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
      for (int64_t e = 0; e < qpb; ++e, ++q) {
        const int8_t* w = group;
        if (whole) w = panel.data() + q * dim * 64;
        else decode(p, codes, tab, q, group, top);
        for (int64_t d = 0; d < dim; ++d) {
          const __m256i xb = _mm256_set1_epi32(static_cast<int>(xp[q * dim + d]));
          const auto* wd = reinterpret_cast<const __m256i*>(w + d * 64);
          a0 = dot4(a0, _mm256_load_si256(wd), xb);
          a1 = dot4(a1, _mm256_load_si256(wd + 1), xb);
        }
      }
      if (blk * p.nseg / p.nblk != seg) {
        seg = blk * p.nseg / p.nblk;
        for (int64_t l = 0; l < kVq8Rows; ++l) s[l] = row_scale(p, b * kVq8Rows + l, blk);
      }
      const __m256 dx = _mm256_set1_ps(p.dx[i * p.nblk + blk]);
      y0 = _mm256_add_ps(y0, _mm256_mul_ps(_mm256_cvtepi32_ps(a0),
                                           _mm256_mul_ps(dx, _mm256_load_ps(s))));
      y1 = _mm256_add_ps(y1, _mm256_mul_ps(_mm256_cvtepi32_ps(a1),
                                           _mm256_mul_ps(dx, _mm256_load_ps(s + 8))));
    }
    _mm256_storeu_ps(out + i * kVq8Rows, y0);
    _mm256_storeu_ps(out + i * kVq8Rows + 8, y1);
  }
  return top;
}

const Kernels kAvx2Kernels = {block_avx2, call_dots, dots_fit};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2Kernels; }

}  // namespace vq8
}  // namespace qk
