// The int4 fast mode (and its 4-bit codebook form, api.h table8) on the AMX tile unit: the amx
// level's entry of gemm_w4 (tile/amx.h does the work). This file says how a block of a tile
// pair reads as 4-code groups: packed vector i of both tiles is one 64-byte register of 16
// dwords, one per column; its low nibbles are codes 8i .. 8i+3 (group 2i), its high nibbles
// codes 8i+4 .. 8i+7 (group 2i + 1); the codebook mode looks them up (vpshufb). Offsets: 8 + z,
// 128 for a codebook (u = table8[c], whose signed codes table8[c] - 128 are t8 itself), the float
// zero points as they are. The exact mode and the activation quantization are the AVX-512 ones.
//
// GCC 12's unmasked AVX-512 intrinsics start from _mm512_undefined_*() and report it as
// maybe-uninitialized once inlined (a false positive: every lane is written).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu/gemm/tile/amx.h"

#include "cpu/gemm/w4/kernels.h"

namespace qk {
namespace w4 {
namespace {

static_assert(kW4Block == tile_amx::kBlock && kW4Rows == tile_avx512::kRows,
              "tile/amx.h takes blocks of 32 codes and 8-row tiles");

template <bool kTable>
struct Format {
  const Problem& p;
  __m512i tbl;  // table8 in every 128-bit lane (kTable)

  explicit Format(const Problem& q) : p(q), tbl(_mm512_setzero_si512()) {
    if (kTable)
      tbl = _mm512_maskz_broadcast_i32x4(
          0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.table8)));
  }
  void decode(int64_t t, int nt, int64_t b, __m512i (&v)[8]) const {
    const int64_t tile_bytes = p.k / kW4Block * kW4TileBlockBytes;
    const uint8_t* w0 = p.packed + t * tile_bytes + b * kW4TileBlockBytes;
    const uint8_t* w1 = w0 + (nt - 1) * tile_bytes;
    const __m512i mask = _mm512_set1_epi8(0x0F);
    for (int i = 0; i < 4; ++i) {
      const __m512i w = tile_avx512::load_pair(w0 + 32 * i, w1 + 32 * i);
      v[2 * i] = _mm512_and_si512(w, mask);
      v[2 * i + 1] = _mm512_and_si512(_mm512_srli_epi16(w, 4), mask);
      if (kTable) {
        v[2 * i] = _mm512_shuffle_epi8(tbl, v[2 * i]);
        v[2 * i + 1] = _mm512_shuffle_epi8(tbl, v[2 * i + 1]);
      }
    }
  }
  bool int_offsets(int64_t t, int nt, int64_t g, __m512i& off) const {
    if (kTable) {
      off = _mm512_set1_epi8(static_cast<char>(128));
      return true;
    }
    if (p.zeros_f) return false;
    return tile_amx::int_offsets_pair(p.zeros, 8, p.k / p.group, t, nt, g, off);
  }
  __m512 offsets(int64_t t, int nt, int64_t g) const {
    if (kTable) return _mm512_set1_ps(128.0f);
    return tile_avx512::offsets_pair(p.zeros_f, p.zeros, 8.0f, p.k / p.group, t, nt, g);
  }
  void rest(int64_t t0, int64_t t1, int64_t m0, int64_t m1) const {
    avx512_kernels()->fast(p, t0, t1, m0, m1);
  }
};

void fast_amx(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (p.table8) tile_amx::fast(Format<true>(p), t0, t1, m0, m1);
  else tile_amx::fast(Format<false>(p), t0, t1, m0, m1);
}

void fast_call_amx(const Problem& p, int64_t tiles, bool parallel) {
  if (p.table8) tile_amx::fast_call(Format<true>(p), tiles, parallel);
  else tile_amx::fast_call(Format<false>(p), tiles, parallel);
}

}  // namespace

const Kernels* amx_kernels() {
  static const Kernels table = {avx512_kernels()->quantize_x, fast_amx, avx512_kernels()->exact,
                                fast_call_amx};
  return &table;
}

}  // namespace w4
}  // namespace qk
