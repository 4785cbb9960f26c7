// AVX-512 (F/BW/VL/DQ + VNNI) kernels of the binary / ternary matmuls (see api.h and avx2.cpp).
//
// Float activations: the AVX2 kernels (tables and lookups), so the bits are AVX2's. A zmm form
// of the lookup (two tiles per zmm, each group's 8-float table broadcast to both halves,
// vpermps zmm) measured slower on Zen 4, which splits zmm permutes into two 256-bit halves
// (1 thread, 4096 x 4096, M = 1 / 2 / 4: binary 0.98x / 0.96x / 0.93x, ternary 0.85x / 0.59x /
// 0.61x the AVX2 speed), so it is not kept.
// XNOR: where the CPU has AVX512_VPOPCNTDQ (not part of the avx512 level: checked at run
// time, the code under its target attribute), one vpopcntd per row and block of an 8-row tile
// (ymm, one weight stream like avx2.cpp: two tiles per zmm measured slower on cold weights)
// instead of the AVX2 kernel's nibble-table popcount; else the AVX2 kernel. Exact integers,
// identical to the scalar kernel.
#include <immintrin.h>

#include <algorithm>

#include "cpu/gemm/bits/kernels.h"
#include "cpu/gemm/bits/xnor_tiles.h"

namespace qk {
namespace bits {
namespace {

constexpr int64_t kPrefetch = 8192;  // bytes ahead in the packed stream (avx2.cpp)

void tables_avx512(const float* x, int64_t K, bool ternary, float* tab) {
  avx2_kernels()->tables(x, K, ternary, tab);  // the same tables (and bits) as AVX2
}

void float_tiles_avx512(const FloatProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  avx2_kernels()->float_tiles(p, m0, m1, t0, t1);  // see the header comment
}

// ---- XNOR --------------------------------------------------------------------------------

// Popcounts of (x_r ^ w) per row lane for MT activation rows over the Kb blocks of one tile
// (the weights masked to the valid bits once per block; x words are zero beyond them).
template <int MT>
__attribute__((target("avx512vpopcntdq"))) void xnor_rows(const uint32_t* const* xr,
                                                          const uint8_t* wt, int64_t Kb,
                                                          uint32_t last, __m256i* out) {
  const __m256i full = _mm256_set1_epi32(static_cast<int>(kBitsWordMask));
  __m256i acc[MT];
  for (int r = 0; r < MT; ++r) acc[r] = _mm256_setzero_si256();
  for (int64_t h = 0; h < Kb; ++h) {
    _mm_prefetch(reinterpret_cast<const char*>(wt + 32 * h + kPrefetch), _MM_HINT_T0);
    const __m256i mask = h + 1 < Kb ? full : _mm256_set1_epi32(static_cast<int>(last));
    const __m256i wv = _mm256_and_si256(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + 32 * h)), mask);
    for (int r = 0; r < MT; ++r) {
      const __m256i d = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(xr[r][h])), wv);
      acc[r] = _mm256_add_epi32(acc[r], _mm256_popcnt_epi32(d));
    }
  }
  for (int r = 0; r < MT; ++r) out[r] = acc[r];
}

void xnor_tiles_vpopcnt(const XnorProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  const int64_t Kb = bits_blocks(p.K);
  const uint32_t last = block_mask(Kb - 1, p.K);
  xnor_tiles_loop(p, m0, m1, t0, t1,
                  [&](int mt, const uint32_t* const* xr, const uint8_t* wt, __m256i* pop) {
                    if (mt == 4) xnor_rows<4>(xr, wt, Kb, last, pop);
                    else if (mt == 2) xnor_rows<2>(xr, wt, Kb, last, pop);
                    else xnor_rows<1>(xr, wt, Kb, last, pop);
                  });
}

void xnor_tiles_avx512(const XnorProblem& p, int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  static const bool kVpopcnt = __builtin_cpu_supports("avx512vpopcntdq");
  if (kVpopcnt) xnor_tiles_vpopcnt(p, m0, m1, t0, t1);
  else avx2_kernels()->xnor_tiles(p, m0, m1, t0, t1);
}

const Kernels kAvx512Kernels = {tables_avx512, float_tiles_avx512, xnor_tiles_avx512,
                                   nullptr};

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace bits
}  // namespace qk
