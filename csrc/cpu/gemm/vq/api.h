// Fused matmul for vector-quantized weights (python/qkern/vq/linear.py VQLinear, GPTVQ's
// layout): y[i][r] = sum_v s[r][v / spv] * dot(x[i][v*dim .. v*dim+dim), book[g(r)][code[r][v]])
// (+ bias[r]), g(r) = r / group_rows, without decoding the weight.
//
// Operands. codes packed in blocks of 16 rows (kVqRows), `packed` (ceil(n/16), nv, 16):
// packed[b][v][l] = code of row 16 b + l, vector v (rows past n: any valid code, their outputs
// are dropped); uint8 or uint16. books (groups, kc, dim) float32, groups = ceil(n /
// group_rows). scales null or (n, nseg) float32, nseg dividing nv (spv = nv / nseg vectors per
// segment). x (m, nv * dim), y (m, n), bias null or (n).
//
// Three algorithms, chosen by the shapes only (never by the ISA or thread count):
// - rows (kc > 32, dim 2, 4 or 8, segments of a multiple of 32 columns): each row decodes
//   its entries (16-byte loads for dim 4) and multiplies them by x in 32 partial sums;
// - table (otherwise, when a block of 16 rows shares its codebook: group_rows % 16 == 0, or
//   one codebook): for each x row and vector v the kc dot products t[v][c] = x_v . book[c]
//   are computed once (in tiles of at most 4096 floats, L1-resident) and each row adds
//   t[v][code] (16 rows per SIMD vector: a lane permutation for kc <= 16 (AVX-512; 8 on
//   AVX2) or 32, else a gather; a 16- or 32-row codebook of <= 16 entries keeps t[v] in a
//   register);
// - lanes (anything else, e.g. a small codebook per row): each lane gathers its own row's
//   entries and multiplies them by x.
// Float contract, bit-identical on every ISA and thread count (mul then add, no FMA):
//   table / lanes: t[v][c] = x[v dim] b[c][0] + x[v dim + 1] b[c][1] + ... (sequentially; the
//   lanes path the same with b = its row's entry); per segment four chains, P_j the sum in
//   order of t over the segment's vectors v with v % 4 == j (v counted from 0 at the row's
//   start), and part = (P_0 + P_1) + (P_2 + P_3);
//   rows: per segment 32 partial sums P[e % 32] = P[e % 32] + w[e] x[e] in column order, then
//   part = the tree P[j] + P[j + h] for h = 16, 8, 4, 2, 1;
//   then acc = acc + s * part (no scales: acc = acc + part, one segment), y = acc (+ bias).
// A code >= kc raises std::invalid_argument (the result is then unspecified): no out-of-range
// read happens (indices are clamped before the look-up, the check is folded into the loop).
#pragma once
#include <cstdint>

namespace qk {

constexpr int64_t kVqRows = 16;

void gemm_vq(const float* x, int64_t m, const uint8_t* packed, int64_t n, int64_t nv,
             const float* books, int64_t groups, int64_t kc, int64_t dim, int64_t group_rows,
             const float* scales, int64_t nseg, const float* bias, float* y);
void gemm_vq(const float* x, int64_t m, const uint16_t* packed, int64_t n, int64_t nv,
             const float* books, int64_t groups, int64_t kc, int64_t dim, int64_t group_rows,
             const float* scales, int64_t nseg, const float* bias, float* y);

// Codebooks of <= 16 entries with the table path (one codebook per layer or per a multiple of
// 16 rows; one scale segment or segments of a multiple of 8 vectors) take 4-bit codes:
// `words` (ceil(n / 16), ceil(nv / 8), 16) uint32, word [b][w][l] holding the codes of row
// 16 b + l, vectors 8 w .. 8 w + 7 at bits 0-3, 4-7, ... (missing vectors / rows: 0). Half the
// bytes of uint8 codes, and one shift instead of a byte widening per look-up; the same bits.
// Other shapes: std::invalid_argument.
void gemm_vq_p4(const float* x, int64_t m, const uint32_t* words, int64_t n, int64_t nv,
                const float* books, int64_t groups, int64_t kc, int64_t dim, int64_t group_rows,
                const float* scales, int64_t nseg, const float* bias, float* y);

// The decoded weight w (n, nv * dim) float32 of any of the three code layouts (layout 0 uint8,
// 1 uint16, 2 4-bit words): w[r][v dim + d] = book[g(r)][code][d] (times the segment's scale:
// one float32 product). For many rows of x, where a GEMM over w beats the fused kernel. A code
// >= kc raises std::invalid_argument.
void vq_decode(const void* packed, int layout, int64_t n, int64_t nv, const float* books,
               int64_t groups, int64_t kc, int64_t dim, int64_t group_rows, const float* scales,
               int64_t nseg, float* w);

}  // namespace qk
