// int4 group-wise weight matmul on the CPU: y (M, N) = x (M, K) @ W^T (+ bias), W (N, K)
// stored as 4-bit codes q in [-8, 7] with one float32 scale (and int32 zero point) per group
// of `group` consecutive elements along K. docs/numerics.md "int4 group-wise matmul" defines
// the layout and both compute modes exactly; the scalar kernels are that definition.
//
// Packed layout: rows are taken in tiles of 8 (N padded with zero codes to Np, a multiple of
// 8), K in blocks of 32. Tile t, block b is 128 contiguous bytes at (t * K/32 + b) * 128: four
// 32-byte vectors i = 0..3, vector i holding codes 8i .. 8i+7 of the block for the 8 rows, one
// 32-bit word per row (row r at bytes 4r .. 4r+3). In a word the codes are unsigned nibbles
// u = q + 8, byte j = u[8i + j] | u[8i + 4 + j] << 4 (j = 0..3). So one AVX2 vector is 8 rows
// x 8 codes: (word >> 4c') & 15 gives one code of every row (the exact mode), and the low /
// high nibbles times a broadcast 32-bit word of int8 activations give every row's partial dot
// product in its own 32-bit lane (the fast mode: no horizontal sums). Scales (and zero
// points) are stored per tile and group as 8 consecutive values, one per row of the tile:
// index (t * K/group + g) * 8 + r.
#pragma once
#include <cstdint>

namespace qk {

constexpr int64_t kW4Rows = 8;    // rows per tile
constexpr int64_t kW4Block = 32;  // codes per block along K
constexpr int64_t kW4TileBlockBytes = kW4Rows * kW4Block / 2;

inline int64_t w4_padded_rows(int64_t n) { return (n + kW4Rows - 1) / kW4Rows * kW4Rows; }
inline int64_t w4_packed_nbytes(int64_t n, int64_t k) { return w4_padded_rows(n) * k / 2; }

// Byte offset of row n's word holding codes 8i .. 8i+7 of block b.
inline int64_t w4_word_offset(int64_t k, int64_t n, int64_t b, int64_t i) {
  return ((n / kW4Rows) * (k / kW4Block) + b) * kW4TileBlockBytes + 32 * i + 4 * (n % kW4Rows);
}

// The unsigned nibble u = q + 8 of element (n, k).
inline int w4_nibble(const uint8_t* packed, int64_t k_total, int64_t n, int64_t k) {
  const int64_t c = k % 8;
  const uint8_t byte = packed[w4_word_offset(k_total, n, k / kW4Block, (k % kW4Block) / 8) + c % 4];
  return c < 4 ? (byte & 15) : (byte >> 4);
}

// codes: int8 (n, k) in [-8, 7], k a multiple of 32; out: w4_packed_nbytes(n, k) bytes.
void pack_w4(const int8_t* codes, int64_t n, int64_t k, uint8_t* out);
void unpack_w4(const uint8_t* packed, int64_t n, int64_t k, int8_t* codes);

enum W4Mode : int { kW4Exact = 0, kW4Fast = 1 };

// y (m, n) float32 = x (m, k) @ W^T (+ bias). Returns true when the fast mode met a NaN or
// Inf in x (y is then unspecified; the exact mode propagates them and returns false). scales / zeros (zeros may be null: symmetric)
// in the tile layout above, w4_padded_rows(n) * k / group values; bias (n) or null.
// group: a positive multiple of 32 dividing k.
// zeros_f (optional, instead of zeros): float zero points of the stored nibble u = q + 8, in the
// same tile layout: w = (float(u) - zf) * s, each step rounded to float32 (HQQ's uint4 codes
// with float zero points; the fast mode's block term du - zf * xs is then one rounded FMA).
// table8 (optional, fast mode only, no zero points): the 4-bit codebook fast mode (gemm_lut4's
// nf4 / fp4 / any 16-entry table, docs/numerics.md "4-bit codebook fast mode"): the stored
// nibble c is a table index and its weight is (table8[c] - 128) * s, table8[c] = t8[c] + 128 in
// [1, 255] (t8 = round(table / tmax * 127), the scales already multiplied by tmax / 127): the
// int4 fast mode with code u = table8[c] and offset zc = 128. With the exact mode or zero
// points: std::invalid_argument.
bool gemm_w4(const float* x, int64_t m, const uint8_t* packed, const float* scales,
             const int32_t* zeros, const float* bias, int64_t n, int64_t k, int64_t group,
             int mode, float* y, const float* zeros_f = nullptr,
             const uint8_t* table8 = nullptr);

}  // namespace qk
