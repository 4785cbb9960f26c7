// The 2-bit / 3-bit fast mode on the AMX tile unit: the amx level's entry of gemm_w23 (tile/amx.h
// does the work). This file says how a block of a tile pair reads as 4-code groups: the AVX-512
// kernel's decoding (decode_avx512.h: (word >> s) & 0x03 / 0x07 per byte, int3's last 8 codes
// assembled from the spare bits). Offsets: zc = -qmin + z (integers; float zero points as they
// are). The exact mode is the AVX-512 one.
//
// GCC 12's unmasked AVX-512 intrinsics start from _mm512_undefined_*() and report it as
// maybe-uninitialized once inlined (a false positive: every lane is written).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "cpu/gemm/tile/amx.h"

#include "cpu/gemm/w23/decode_avx512.h"
#include "cpu/gemm/w23/kernels.h"

namespace qk {
namespace w23 {
namespace {

static_assert(kW23Block == tile_amx::kBlock && kW23Rows == tile_avx512::kRows,
              "tile/amx.h takes blocks of 32 codes and 8-row tiles");

template <int BITS>
struct Format {
  const Problem& p;

  void decode(int64_t t, int nt, int64_t b, __m512i (&v)[8]) const {
    const int64_t tbb = w23_tile_block_bytes(BITS), nb = p.k / kW23Block;
    const uint8_t* b0 = p.packed + (t * nb + b) * tbb;
    if (nt == 2) decode_u8<BITS, true>(b0, b0 + nb * tbb, v);
    else decode_u8<BITS, false>(b0, b0, v);
  }
  bool int_offsets(int64_t t, int nt, int64_t g, __m512i& off) const {
    const int zc0 = static_cast<int>(p.zc0);  // -qmin: 0, 2 or 4
    if (p.zeros_f || static_cast<float>(zc0) != p.zc0) return false;
    return tile_amx::int_offsets_pair(p.zeros, zc0, p.k / p.group, t, nt, g, off);
  }
  __m512 offsets(int64_t t, int nt, int64_t g) const {
    return tile_avx512::offsets_pair(p.zeros_f, p.zeros, p.zc0, p.k / p.group, t, nt, g);
  }
  void rest(int64_t t0, int64_t t1, int64_t m0, int64_t m1) const {
    avx512_kernels()->fast(p, t0, t1, m0, m1);
  }
};

void fast_amx(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  if (p.bits == 2) tile_amx::fast(Format<2>{p}, t0, t1, m0, m1);
  else tile_amx::fast(Format<3>{p}, t0, t1, m0, m1);
}

void fast_call_amx(const Problem& p, int64_t tiles, bool parallel) {
  if (p.bits == 2) tile_amx::fast_call(Format<2>{p}, tiles, parallel);
  else tile_amx::fast_call(Format<3>{p}, tiles, parallel);
}

}  // namespace

const Kernels* amx_kernels() {
  static const Kernels table = {fast_amx, avx512_kernels()->exact, fast_call_amx};
  return &table;
}

}  // namespace w23
}  // namespace qk
