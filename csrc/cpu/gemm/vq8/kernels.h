// Internal interface of gemm_vq8 (api.h): the per-ISA loop over one block of 16 rows.
#pragma once
#include <cstdint>
#include <functional>

#include "cpu/gemm/vq8/api.h"
#include "cpu/runtime/isa.h"

namespace qk {
namespace vq8 {

// One call's operands as the block loops see them. xp: the activation codes regrouped per x
// row as (nv / 4, dim) 32-bit words, word [q][d] = bytes xq[(4 q + t) dim + d] for t = 0..3 (the
// four vectors of a code group, dimension d); dx / xs: per row and block of 32 the scale and
// the sum of the codes (exact in float). tables: per codebook group, dim planes of 256 bytes,
// plane d byte c = books8[g][c][d] (c < kc; 0 past kc).
struct Problem {
  const uint32_t* xp;
  const float* dx;
  const float* xs;
  int64_t m, nv, dim, kc, nblk;  // nblk = K / 32
  const uint8_t* packed4;
  bool nib;  // 4-bit layout (api.h)
  const int8_t* tables;
  const float* scales;  // null or (n, nseg); nseg = 1 without scales
  int64_t n, nseg;
  int64_t groups, group_rows;  // codebook groups (tables: groups x dim x 256 bytes)
};

// The codebook tables of 16-row block b.
inline const int8_t* block_tables(const Problem& p, int64_t b) {
  const int64_t g = p.groups == 1 ? 0 : b * kVq8Rows / p.group_rows;
  return p.tables + g * p.dim * 256;
}

// Block b (16 rows; codebook tables `tab`, dim * 256 bytes) for x rows [0, m): acc[i][l] as
// api.h defines it (before bs and bias), stored at out[i * 16 + l]; rows past n get scale 0.
// Returns the largest code read.
using BlockFn = uint32_t (*)(const Problem& p, int64_t b, const int8_t* tab, float* out);

// store(b, out): block b's outputs, out[i * 16 + l] as BlockFn leaves them, into y (entry.cpp).
using BlockStore = std::function<void(int64_t b, const float* out)>;

// A whole call where the level has a call-wide path (amx: amx.cpp, from 16 rows of x; avx2:
// dots_avx2.cpp, 1-3 rows of x and codebooks past 16 entries): every 16-row block's outputs
// through `store` (each block once, from one task; the same bits as BlockFn), on the pool
// when `parallel`. Returns the largest code read. Null elsewhere; `fits` says whether it
// takes problem p (else the blocks run through `block`).
using CallFn = uint32_t (*)(const Problem& p, bool parallel, const BlockStore& store);
using FitsFn = bool (*)(const Problem& p);

struct Kernels {
  BlockFn block;
  CallFn call;
  FitsFn fits;
};

// Bytes of one 16-row block's codes.
inline int64_t block_bytes(const Problem& p) { return p.nv * kVq8Rows / (p.nib ? 2 : 1); }

// Code (row l, vector 4 q + t) of the block at `codes`.
inline uint32_t code_at(const Problem& p, const uint8_t* codes, int64_t q, int64_t l,
                        int64_t t) {
  if (!p.nib) return codes[(q * kVq8Rows + l) * kVq8Group + t];
  const uint8_t byte = codes[((q / 2) * kVq8Rows + l) * kVq8Group + t];
  return q % 2 ? byte >> 4 : byte & 15u;
}

// The segment scale of row r for block of 32 `blk` (1 without scales; 0 past n).
inline float row_scale(const Problem& p, int64_t r, int64_t blk) {
  if (r >= p.n) return 0.0f;
  return p.scales ? p.scales[r * p.nseg + blk * p.nseg / p.nblk] : 1.0f;
}

// avx2's call-wide path (dots_avx2.cpp): 1-3 rows of x, codebooks past 16 entries (8-bit
// codes), one x row's table of dot products within 16 MiB (rows go in batches).
bool dots_fit(const Problem& p);
uint32_t call_dots(const Problem& p, bool parallel, const BlockStore& store);

extern const Kernels kScalarKernels;  // scalar.cpp
const Kernels* avx2_kernels();        // avx2.cpp
const Kernels* avx512_kernels();      // avx512.cpp (VBMI; else the AVX2 table)
#ifdef QK_HAVE_AMX
const Kernels* amx_kernels();  // amx.cpp (VBMI; else the avx512 level's table)
#else
inline const Kernels* amx_kernels() { return nullptr; }  // the compiler has no AMX flags
#endif

inline const Kernels& kernels() {
  const Kernels* const by_isa[] = {&kScalarKernels, avx2_kernels(), avx512_kernels(),
                                   amx_kernels()};
  return pick(by_isa);
}

}  // namespace vq8
}  // namespace qk
