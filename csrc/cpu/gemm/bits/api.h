// 1-bit (binary) and 1.58-bit (ternary) weight matmuls with one scale per output channel.
//
// Packed layout (docs/numerics.md "Binary and ternary matmul"): output channels in tiles of 8
// (N padded with zero bytes to Np, a multiple of 8), K in blocks of 30 (Kb = ceil(K / 30)).
// Tile t, block h is one 32-byte vector per bit plane, lane r (bytes 4r .. 4r+3) the
// little-endian 32-bit word of row 8t + r whose bit j (j < 30) is weight k = 30h + j; bits 30
// and 31 and bits of k >= K are ignored.
//   binary : one plane, bit = 1 when w[n, k] = -1 (0: +1). Bytes (t * Kb + h) * 32.
//   ternary: two planes, P (w = +1) then Q (w = -1), at (t * Kb + h) * 64 and + 32; the weight
//            is P - Q (both bits set: 0; the packer never writes that).
// So one vector holds 10 groups of 3 consecutive weights for 8 rows, and `word >> 3j` puts
// group j's 3-bit pattern in every lane's low bits: the index vpermps reads. The AVX2 float
// kernels look each pattern up in a per-call table of the 8 signed (binary) or subset
// (ternary) sums of the group's 3 activations, one table shared by all weight rows.
//
//   float activations: y[m, n] = alpha[n] * sum_k w[n, k] x[m, k] (+ bias[n]), sums of +-x in
//                      float32 (the scalar reference in k order; AVX2 in another order).
//   xnor (binary only): x binarized per row, bit = (x < 0) (so 0 and -0.0 give +1), beta[m] =
//                      float32(sum |x[m]| in float64, in index order / K) (0 for a zero row);
//                      y = float(K - 2*popcount(xbits ^ wbits)) * (alpha[n] * beta[m]) (+ bias[n]),
//                      bit-identical on every ISA and thread count.
#pragma once
#include <cstdint>

namespace qk {

constexpr int64_t kBitsRows = 8;     // output channels per tile
constexpr int64_t kBitsBlock = 30;   // weights per block (one 32-bit word per row and plane)
constexpr int64_t kBitsGroups = 10;  // groups of 3 weights per block
constexpr uint32_t kBitsWordMask = (uint32_t{1} << kBitsBlock) - 1;

inline int64_t bits_blocks(int64_t K) { return (K + kBitsBlock - 1) / kBitsBlock; }
inline int64_t bits_padded_rows(int64_t N) { return (N + kBitsRows - 1) / kBitsRows * kBitsRows; }
inline int64_t bits_planes(bool ternary) { return ternary ? 2 : 1; }
inline int64_t bits_packed_nbytes(int64_t N, int64_t K, bool ternary) {
  return bits_padded_rows(N) * 4 * bits_blocks(K) * bits_planes(ternary);
}
// Byte offset of row n's word of block h in `plane` (0: binary / ternary P, 1: ternary Q).
inline int64_t bits_word_offset(int64_t K, bool ternary, int64_t n, int64_t h, int plane) {
  const int64_t planes = bits_planes(ternary);
  return (((n / kBitsRows) * bits_blocks(K) + h) * planes + plane) * 32 + 4 * (n % kBitsRows);
}

// codes (N, K) row-major: binary 0 (+1) / 1 (-1); ternary -1, 0, 1. out:
// bits_packed_nbytes(N, K, ternary) bytes. Returns false (out unspecified) on a code out of
// range.
bool pack_binary(const uint8_t* codes, int64_t N, int64_t K, uint8_t* out);
bool pack_ternary(const int8_t* codes, int64_t N, int64_t K, uint8_t* out);

// x (M, K), y (M, N) float32 row-major; alpha (N); bias (N) or null.
void gemm_binary(const float* x, int64_t M, const uint8_t* wbits, const float* alpha,
                 const float* bias, int64_t N, int64_t K, bool xnor, float* y);
void gemm_ternary(const float* x, int64_t M, const uint8_t* wpacked, const float* alpha,
                  const float* bias, int64_t N, int64_t K, float* y);

}  // namespace qk
