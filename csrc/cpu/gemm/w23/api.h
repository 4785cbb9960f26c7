// 2-bit and 3-bit group-wise weight matmul on the CPU: y (M, N) = x (M, K) @ W^T (+ bias),
// W (N, K) stored as B-bit codes (B = 2 or 3) with one float32 scale (and optional int32 zero
// point) per group of `group` consecutive elements along K:
//     w[n][k] = float(q - z) * s,   q = u + qmin,   u the stored unsigned code in [0, 2^B)
// (qmin = -2^(B-1) for int2/int3, 0 for uint2/uint3; z = 0 when there are no zero points).
// docs/numerics.md "2-bit and 3-bit group-wise matmul" defines the layout and both compute
// modes exactly; the scalar kernels are that definition.
//
// Packed layout: rows in tiles of 8 (N padded with zero codes to a multiple of 8), K in
// blocks of 32. Tile t, block b is 32 * B contiguous bytes at (t * K/32 + b) * 32 * B: B
// vectors i = 0..B-1 of 32 bytes, each holding one little-endian 32-bit word per row (row r at
// bytes 4r .. 4r+3). So the block is exactly B bits per weight and one AVX2 vector is 8 rows,
// every row's sums staying in its own 32-bit lane. Inside the B words w_0 .. w_{B-1} of a row,
// code c = 0..31 of the block (k = 32 b + c) sits at:
//   B = 2: word c / 16, bits 8 j + 2 p .. +1 with j = c % 4, p = (c % 16) / 4
//          (byte j of word i = u[16i + j] | u[16i + 4 + j] << 2 | u[16i + 8 + j] << 4
//                               | u[16i + 12 + j] << 6);
//   B = 3: c < 24: word c / 8, bits 8 j + 3 h .. +2 with j = c % 4, h = (c % 8) / 4
//          (bits 0-5 of byte j of word i = u[8i + j] | u[8i + 4 + j] << 3);
//          c = 24 + 4 i + j (i = 0, 1): low two bits at bits 8 j + 6 .. 7 of word i, high bit
//          at bit 8 j + 6 + i of word 2 (bits 6, 7 of word 2's bytes).
// So (w >> s) & 0x03030303 (B = 2) or & 0x07070707 (B = 3) gives four consecutive codes of
// every row in bytes (the int8 fast mode's operand), and one masked field per code converts
// exactly to float (the exact mode). Scales (and zero points) are stored per tile and group as
// 8 consecutive values, one per row of the tile: index (t * K/group + g) * 8 + r.
#pragma once
#include <cstdint>
#include <cstring>

namespace qk {

constexpr int64_t kW23Rows = 8;    // rows per tile
constexpr int64_t kW23Block = 32;  // codes per block along K

inline int64_t w23_padded_rows(int64_t n) { return (n + kW23Rows - 1) / kW23Rows * kW23Rows; }
inline int64_t w23_tile_block_bytes(int bits) { return 4 * kW23Rows * bits; }
inline int64_t w23_packed_nbytes(int64_t n, int64_t k, int bits) {
  return w23_padded_rows(n) * k * bits / 8;
}

// Byte offset of row n's word i of block b.
inline int64_t w23_word_offset(int bits, int64_t k, int64_t n, int64_t b, int64_t i) {
  return ((n / kW23Rows) * (k / kW23Block) + b) * w23_tile_block_bytes(bits) + 32 * i +
         4 * (n % kW23Rows);
}

inline uint32_t w23_word(const uint8_t* packed, int bits, int64_t k, int64_t n, int64_t b,
                         int64_t i) {
  uint32_t w;
  std::memcpy(&w, packed + w23_word_offset(bits, k, n, b, i), 4);
  return w;  // little-endian hosts only (x86)
}

// The unsigned code u of element (n, kk) (K = k_total).
inline int w23_code(const uint8_t* packed, int bits, int64_t k_total, int64_t n, int64_t kk) {
  const int64_t b = kk / kW23Block;
  const int c = static_cast<int>(kk % kW23Block);
  if (bits == 2) {
    const uint32_t w = w23_word(packed, 2, k_total, n, b, c / 16);
    return static_cast<int>(w >> (8 * (c % 4) + 2 * ((c % 16) / 4))) & 3;
  }
  if (c < 24) {
    const uint32_t w = w23_word(packed, 3, k_total, n, b, c / 8);
    return static_cast<int>(w >> (8 * (c % 4) + 3 * ((c % 8) / 4))) & 7;
  }
  const int i = (c - 24) / 4, j = c % 4;
  const uint32_t lo = w23_word(packed, 3, k_total, n, b, i) >> (8 * j + 6);
  const uint32_t hi = w23_word(packed, 3, k_total, n, b, 2) >> (8 * j + 6 + i);
  return static_cast<int>((lo & 3) | (hi & 1) << 2);
}

// codes: unsigned u (n, k) in [0, 2^bits), k a multiple of 32; out: w23_packed_nbytes bytes.
void pack_w23(const uint8_t* codes, int64_t n, int64_t k, int bits, uint8_t* out);
void unpack_w23(const uint8_t* packed, int64_t n, int64_t k, int bits, uint8_t* codes);

enum W23Mode : int { kW23Exact = 0, kW23Fast = 1 };

// y (m, n) float32 = x (m, k) @ W^T (+ bias). Returns true when the fast mode met a NaN or
// Inf in x (y is then unspecified; the exact mode propagates them and returns false).
// scales / zeros (zeros may be null) in the tile layout above, w23_padded_rows(n) * k / group values; bias (n) or null. bits: 2 or 3; qmin:
// the code of u = 0 (so w = float(u + qmin - z) * s). group: a positive multiple of 32
// dividing k. zeros_f (optional, instead of zeros): float zero points of the stored code u, in the
// same tile layout: w = (float(u) - zf) * s, each step rounded to float32 (HQQ).
bool gemm_w23(const float* x, int64_t m, const uint8_t* packed, const float* scales,
              const int32_t* zeros, const float* bias, int64_t n, int64_t k, int64_t group,
              int bits, int qmin, int mode, float* y, const float* zeros_f = nullptr);

}  // namespace qk
