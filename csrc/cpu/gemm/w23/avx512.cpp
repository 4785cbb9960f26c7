// AVX-512 (F/BW/VL/DQ + VNNI) 2-bit / 3-bit matmul kernels. Same float32 operations in the
// same order as the scalar kernels (scalar.cpp), so every path gives identical bits. A zmm is
// two 8-row tiles (t in lanes 0-7, t + 1 in lanes 8-15: two 32-byte loads, one insert); a
// last odd tile runs alone with the upper half zero and masked off at the store.
// - fast mode: a block's 32 codes of 16 rows become 8 vectors of u8 codes, vector c holding
//   codes 4c .. 4c+3 of every row in its lane ((word >> s) & 0x03 / 0x07 per byte, geo.h), so
//   one vpdpbusd per vector with the block's 4 int8 activations 4c .. 4c+3 (a broadcast dword)
//   adds each row's exact int32 dot product in its lane: 8 vpdpbusd per row and block, the
//   decoding shared by up to 4 activation rows. A single row runs one tile at a time in ymm
//   (one weight stream, as AVX2: two tiles' streams at once ran 0.8x AVX2 on cold weights) and
//   skips the shifts: vpdpbusd on the fields masked in place (block_dot_inplace). Then, as
//   scalar: idot = fma(-zc, xs, du), acc = fma(dx, idot, acc) per block, y = fma(scale, acc, y)
//   per group.
// - exact mode: up to 3 rows, codes decoded on the fly ((word & mask) converts exactly to
//   u * 2^sh, one FMA by 2^-sh gives u - zc exactly), FMA chains along k, 4 tile pairs at a
//   time; more rows: a tile pair decoded once per chunk of groups into k-major floats (16 per
//   k: one zmm), then 8 rows x 16 columns of FMA chains (one load and 8 FMAs per k): the
//   GEMM shared with int4, tile_avx512::exact_gemm.
#include <immintrin.h>

#include <algorithm>

#include "cpu/gemm/tile/avx512.h"
#include "cpu/gemm/tile/vnni_avx512.h"
#include "cpu/gemm/w23/decode_avx512.h"
#include "cpu/gemm/w23/geo.h"
#include "cpu/gemm/w23/kernels.h"

namespace qk {
namespace w23 {
namespace {

constexpr int64_t kPrefetch = 8192;  // bytes ahead in the packed stream of a tile
// The one-row GEMV streams its weights from memory: into L2, as int4's (w4/avx512.cpp
// kGemvPrefetch). Measured on Zen 4, weights cold, 2 threads: 16 KiB / T1 ran int3 1.15-1.27x
// and int2 1.0-1.17x the 8 KiB / T0 above; with the 1 MiB tasks (tile/driver.h kTaskBytes),
// 8 KiB / T1 ran int2 1-9 % and int3 1-5 % faster than 16 KiB / T1 (rotated-order C++ A/B,
// docs/speed.md "Sixteenth pass"); 4 KiB / T0 won at K = 4096 and lost at K = 11008.
constexpr int64_t kGemvPrefetch = 8192;

// The lines of one block kPrefetch bytes ahead (a 2-bit block is one 64-byte line).
template <int BITS>
inline void prefetch_block(const uint8_t* blk) {
  _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch), _MM_HINT_T0);
  if (BITS == 3) _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch + 64), _MM_HINT_T0);
}

// The operands of tile pair (t, t + 1) at block b / group g.
struct Pair {
  const Problem& p;
  int64_t t, nb, ng, tbb;
  Pair(const Problem& q, int64_t t_, int bits)
      : p(q), t(t_), nb(q.k / kW23Block), ng(q.k / q.group), tbb(w23_tile_block_bytes(bits)) {}
  const uint8_t* blk0(int64_t b) const { return p.packed + (t * nb + b) * tbb; }
  const uint8_t* blk1(int64_t b) const { return p.packed + ((t + 1) * nb + b) * tbb; }
  int64_t par0(int64_t g) const { return (t * ng + g) * kW23Rows; }
  int64_t par1(int64_t g) const { return ((t + 1) * ng + g) * kW23Rows; }
  // The scales / code offsets zc = float(-qmin) + float(z) (the float zero points if given)
  // of the pair's rows (tile t's alone in both halves when !kTwo: the upper lanes are dropped).
  template <bool kTwo>
  __m512 scales(int64_t g) const {
    return tile_avx512::params_pair(p.scales, ng, t, kTwo ? 2 : 1, g);
  }
  template <bool kTwo>
  __m512 offsets(int64_t g) const {
    return tile_avx512::offsets_pair(p.zeros_f, p.zeros, p.zc0, ng, t, kTwo ? 2 : 1, g);
  }
  __m256 offsets8(int64_t g) const {  // offsets() of tile t alone
    if (p.zeros_f) return _mm256_loadu_ps(p.zeros_f + par0(g));
    const __m256 zc0 = _mm256_set1_ps(p.zc0);
    if (!p.zeros) return zc0;
    return _mm256_add_ps(zc0, _mm256_cvtepi32_ps(load8(
                                  reinterpret_cast<const uint8_t*>(p.zeros + par0(g)))));
  }
  template <int BITS, bool kTwo>
  void prefetch(int64_t b) const {
    prefetch_block<BITS>(blk0(b));
    if (kTwo) prefetch_block<BITS>(blk1(b));
  }
};

// y[m, 8t .. 8t + 16) = v (+ bias), rows past n (and the second tile when !two) dropped.
inline void store_pair(const Problem& p, int64_t m, int64_t t, bool two, __m512 v) {
  const int64_t n0 = t * kW23Rows;
  const int64_t cnt = std::min<int64_t>(two ? 16 : 8, p.n - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1);
  if (p.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p.bias + n0));
  _mm512_mask_storeu_ps(p.y + m * p.n + n0, mask, v);
}

// ---- fast mode ---------------------------------------------------------------------------

// One row's exact int32 dots over a block of the pair (row r in lane r) from the fields left in
// place: (word & field mask) is u * 2^e in each byte (at most 192: a valid vpdpbusd u8 operand),
// so the dots of the fields with the same e are summed in one accumulator and shifted down
// once (exact: each such sum is a multiple of 2^e). For one row this saves the shifts that
// move every field to bit 0; B = 3's codes 24 .. 31 come as low bits (e = 6) plus a high bit
// (at e = 6 or 7, scaled up to 8 before the shared shift).
template <int BITS, typename V>
inline typename V::I block_dot_inplace(const V& w, const int8_t* xq) {
  using I = typename V::I;
  auto dp = [&](I acc, I v, int mask, int c) {
    return vnni::dpbusd_x4(acc, V::and8(v, mask), xq + 4 * c);
  };
  if constexpr (BITS == 2) {
    I s[4] = {V::zero(), V::zero(), V::zero(), V::zero()};  // s[q]: fields at bit 2q
    for (int i = 0; i < 2; ++i) {
      const I v = w.load(i);
      for (int q = 0; q < 4; ++q) s[q] = dp(s[q], v, 0x03 << (2 * q), 4 * i + q);
    }
    const I a = V::add(s[0], V::template srai<2>(s[1]));
    return V::add(V::add(a, V::template srai<4>(s[2])), V::template srai<6>(s[3]));
  } else {
    I s1 = V::zero(), s8 = V::zero(), s64 = V::zero(), h0 = V::zero(), h1 = V::zero();
    I v[3];
    for (int i = 0; i < 3; ++i) {
      v[i] = w.load(i);
      s1 = dp(s1, v[i], 0x07, 2 * i);
      s8 = dp(s8, v[i], 0x38, 2 * i + 1);
    }
    s64 = dp(dp(s64, v[0], 0xC0, 6), v[1], 0xC0, 7);  // low bits of codes 24 .. 31
    h0 = dp(h0, v[2], 0x40, 6);                        // high bit of codes 24 .. 27: 64 u2
    h1 = dp(h1, v[2], 0x80, 7);                        // of codes 28 .. 31: 128 u2
    const I hi = V::add(V::template slli<2>(h0), V::template slli<1>(h1));
    const I a = V::add(s1, V::template srai<3>(s8));
    return V::add(a, V::template srai<6>(V::add(s64, hi)));
  }
}

// A block of one 8-row tile (ymm, AVX-512 VL) for block_dot_inplace.
struct TileYmm {
  using I = __m256i;
  const uint8_t* blk;
  I load(int i) const { return load8(blk + 32 * i); }
  static I zero() { return _mm256_setzero_si256(); }
  static I and8(I v, int m) { return _mm256_and_si256(v, _mm256_set1_epi8(static_cast<char>(m))); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  template <int N>
  static I srai(I v) { return _mm256_srai_epi32(v, N); }
  template <int N>
  static I slli(I v) { return _mm256_slli_epi32(v, N); }
};

// One row, one tile, in ymm: the tile's blocks read in order, one stream (as the AVX2 kernel:
// measured faster on cold weights than two tiles' streams at once).
template <int BITS>
void fast_tile_row(const Problem& p, int64_t t, int64_t m) {
  const Pair pr(p, t, BITS);
  const int64_t bpg = p.group / kW23Block;
  const int8_t* xq = p.xq + m * p.k;
  const float* dx = p.dx + m * pr.nb;
  const float* xs = p.xs + m * pr.nb;
  __m256 y = _mm256_setzero_ps();
  for (int64_t g = 0; g < pr.ng; ++g) {
    const __m256 zc = pr.offsets8(g);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const char* pf = reinterpret_cast<const char*>(pr.blk0(b)) + kGemvPrefetch;
      _mm_prefetch(pf, _MM_HINT_T1);
      if (BITS == 3) _mm_prefetch(pf + 64, _MM_HINT_T1);  // a 96-byte block spans 2 lines
      const __m256i dot = block_dot_inplace<BITS>(TileYmm{pr.blk0(b)}, xq + b * kW23Block);
      const __m256 du = _mm256_cvtepi32_ps(dot);
      acc = _mm256_fmadd_ps(_mm256_set1_ps(dx[b]),
                            _mm256_fnmadd_ps(zc, _mm256_set1_ps(xs[b]), du), acc);
    }
    y = _mm256_fmadd_ps(_mm256_loadu_ps(p.scales + pr.par0(g)), acc, y);
  }
  const int64_t n0 = t * kW23Rows;  // y[m, 8t .. 8t + 8) = y (+ bias), rows past n dropped
  const __mmask8 mask = static_cast<__mmask8>((1u << std::min<int64_t>(8, p.n - n0)) - 1);
  if (p.bias) y = _mm256_add_ps(y, _mm256_maskz_loadu_ps(mask, p.bias + n0));
  _mm256_mask_storeu_ps(p.y + m * p.n + n0, mask, y);
}

// Rows [m, m + MR) of tile pair t.
template <int BITS, int MR, bool kTwo>
void fast_rows(const Problem& p, int64_t t, int64_t m) {
  const Pair pr(p, t, BITS);
  const int64_t bpg = p.group / kW23Block;
  __m512 y[MR], acc[MR];
  for (int r = 0; r < MR; ++r) y[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < pr.ng; ++g) {
    const __m512 zc = pr.offsets<kTwo>(g);
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      pr.prefetch<BITS, kTwo>(b);
      __m512i u[8];
      decode_u8<BITS, kTwo>(pr.blk0(b), pr.blk1(b), u);
      for (int r = 0; r < MR; ++r) {
        const int8_t* xq = p.xq + (m + r) * p.k + b * kW23Block;
        __m512i s0 = vnni::dpbusd_x4(_mm512_setzero_si512(), u[0], xq);
        __m512i s1 = vnni::dpbusd_x4(_mm512_setzero_si512(), u[1], xq + 4);
        for (int c = 2; c < 8; c += 2) {
          s0 = vnni::dpbusd_x4(s0, u[c], xq + 4 * c);
          s1 = vnni::dpbusd_x4(s1, u[c + 1], xq + 4 * c + 4);
        }
        const __m512i dot = _mm512_add_epi32(s0, s1);  // exact int32 sums
        const __m512 du = cvt(dot);
        const int64_t bi = (m + r) * pr.nb + b;
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(p.dx[bi]),
                                 _mm512_fnmadd_ps(zc, _mm512_set1_ps(p.xs[bi]), du), acc[r]);
      }
    }
    const __m512 sc = pr.scales<kTwo>(g);
    for (int r = 0; r < MR; ++r) y[r] = _mm512_fmadd_ps(sc, acc[r], y[r]);
  }
  for (int r = 0; r < MR; ++r) store_pair(p, m + r, t, kTwo, y[r]);
}

template <int BITS, bool kTwo>
void fast_pair(const Problem& p, int64_t t, int64_t m0, int64_t m1) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) fast_rows<BITS, 4, kTwo>(p, t, m);
  switch (m1 - m) {
    case 3: fast_rows<BITS, 3, kTwo>(p, t, m); break;
    case 2: fast_rows<BITS, 2, kTwo>(p, t, m); break;
    case 1:  // one row: one tile at a time (fast_tile_row)
      fast_tile_row<BITS>(p, t, m);
      if (kTwo) fast_tile_row<BITS>(p, t + 1, m);
      break;
    default: break;
  }
}

template <int BITS>
void fast_avx512(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (m1 - m0 == 1) {
    for (int64_t t = t0; t < t1; ++t) fast_tile_row<BITS>(p, t, m0);
    return;
  }
  int64_t t = t0;
  for (; t + 2 <= t1; t += 2) fast_pair<BITS, true>(p, t, m0, m1);
  if (t < t1) fast_pair<BITS, false>(p, t, m0, m1);
}

void fast_dispatch(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (p.bits == 2) fast_avx512<2>(p, t0, t1, m0, m1);
  else fast_avx512<3>(p, t0, t1, m0, m1);
}

// ---- exact mode --------------------------------------------------------------------------

// float(u) - zc for the W-bit field at bit SH of every lane, exactly (see avx2.cpp).
template <int SH, int W>
inline __m512 field_minus(__m512i v, __m512 zc) {
  if constexpr (SH + W == 32) {
    return _mm512_sub_ps(cvt(srli32<SH>(v)), zc);
  } else {
    const __m512 f =
        cvt(_mm512_and_si512(v, _mm512_set1_epi32(((1 << W) - 1) << SH)));
    if constexpr (SH == 0) return _mm512_sub_ps(f, zc);
    else return _mm512_fmsub_ps(f, _mm512_set1_ps(1.0f / static_cast<float>(1 << SH)), zc);
  }
}

// Calls f(k, w) for every k of the block (in order), w = float(u) - zc of the pair's rows.
template <int BITS, int NP, bool kTwo, typename F>
inline void block_fields(const uint8_t* const* b0, const uint8_t* const* b1, const __m512* zc,
                         F&& f) {
  using G = Geo<BITS>;
  static_for<G::kSteps>([&](auto s) {
    constexpr int S = decltype(s)::value;
    __m512i v[NP];
    for (int j = 0; j < NP; ++j) v[j] = word<BITS, S, kTwo>(b0[j], b1[j]);
    static_for<G::count(S)>([&](auto c) {
      constexpr int C = decltype(c)::value;
      __m512 w[NP];
      for (int j = 0; j < NP; ++j) w[j] = field_minus<G::shift(S, C), G::kWidth>(v[j], zc[j]);
      f(G::first(S) + C, w);
    });
  });
}

// Row m, tile pairs t, t + 2, .. (NP of them): NP independent FMA chains.
template <int BITS, int NP, bool kTwo>
void exact_pairs_row(const Problem& p, int64_t t, int64_t m) {
  const int64_t bpg = p.group / kW23Block;
  const float* x = p.x + m * p.k;
  __m512 y[NP];
  for (int j = 0; j < NP; ++j) y[j] = _mm512_setzero_ps();
  const Pair p0(p, t, BITS);
  for (int64_t g = 0; g < p0.ng; ++g) {
    __m512 zc[NP], a[NP];
    for (int j = 0; j < NP; ++j) {
      zc[j] = Pair(p, t + 2 * j, BITS).offsets<kTwo>(g);
      a[j] = _mm512_setzero_ps();
    }
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const uint8_t* b0[NP];
      const uint8_t* b1[NP];
      for (int j = 0; j < NP; ++j) {
        const Pair q(p, t + 2 * j, BITS);
        b0[j] = q.blk0(b);
        b1[j] = q.blk1(b);
        q.template prefetch<BITS, kTwo>(b);
      }
      const float* xk = x + b * kW23Block;
      block_fields<BITS, NP, kTwo>(b0, b1, zc, [&](int k, const __m512* w) {
        const __m512 xb = _mm512_set1_ps(xk[k]);
        for (int j = 0; j < NP; ++j) a[j] = _mm512_fmadd_ps(xb, w[j], a[j]);
      });
    }
    for (int j = 0; j < NP; ++j)
      y[j] = _mm512_fmadd_ps(Pair(p, t + 2 * j, BITS).scales<kTwo>(g), a[j], y[j]);
  }
  for (int j = 0; j < NP; ++j) store_pair(p, m, t + 2 * j, kTwo, y[j]);
}

// Groups [g0, g1) of the pair as k-major floats: w[(k - g0 * group) * 16 + lane].
template <int BITS, bool kTwo>
void decode_pair(const Problem& p, int64_t t, int64_t g0, int64_t g1, float* w) {
  const Pair pr(p, t, BITS);
  const int64_t bpg = p.group / kW23Block;
  for (int64_t g = g0; g < g1; ++g) {
    const __m512 zc[1] = {pr.offsets<kTwo>(g)};
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const uint8_t* b0[1] = {pr.blk0(b)};
      const uint8_t* b1[1] = {pr.blk1(b)};
      float* d = w + (b * kW23Block - g0 * p.group) * 16;
      block_fields<BITS, 1, kTwo>(b0, b1, zc, [&](int k, const __m512* v) {
        _mm512_storeu_ps(d + k * 16, v[0]);
      });
    }
  }
}

template <int BITS>
void exact_avx512(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (m1 - m0 < 4) {
    for (int64_t m = m0; m < m1; ++m) {
      int64_t t = t0;
      for (; t + 8 <= t1; t += 8) exact_pairs_row<BITS, 4, true>(p, t, m);
      for (; t + 2 <= t1; t += 2) exact_pairs_row<BITS, 1, true>(p, t, m);
      if (t < t1) exact_pairs_row<BITS, 1, false>(p, t, m);
    }
    return;
  }
  // More rows: the shared k-major GEMM (tile/avx512.h), tile pairs decoded by decode_pair.
  tile_avx512::exact_gemm(p, t0, t1, m0, m1,
                          [&p](int64_t t, int nt, int64_t g0, int64_t g1, float* w) {
                            if (nt == 2) decode_pair<BITS, true>(p, t, g0, g1, w);
                            else decode_pair<BITS, false>(p, t, g0, g1, w);
                          });
}

void exact_dispatch(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (p.bits == 2) exact_avx512<2>(p, t0, t1, m0, m1);
  else exact_avx512<3>(p, t0, t1, m0, m1);
}

const Kernels kAvx512Kernels = {fast_dispatch, exact_dispatch, nullptr};

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512Kernels; }

}  // namespace w23
}  // namespace qk
