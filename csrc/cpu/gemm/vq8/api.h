// The VQ matmul's fast mode (qkern::gemm_vq8): gemm_vq's weights (vq/api.h) with int8
// codebooks, multiplied by int8 activations with 4-way integer dot products (vpdpbusd), the
// way llama.cpp's IQ2 kernels run; about the int2 kernel's speed at 2 bits per weight.
//
//   y[i][r] = bs[g(r)] * acc[i][r] (+ bias[r]),   g(r) = r / group_rows,
//   acc = 0; for each block B of 32 columns in order: acc = acc + float(D) * t,
//   D = sum_{k in B} w8[r][k] * xq[i][k]   (exact, int32),
//   t = dx[i][B] * s[r][seg(B)]   (one float32 product; without scales t = dx[i][B]),
//   w8[r][v dim + d] = books8[g(r)][code(r, v)][d]   (int8 in [-127, 127]),
// xq / dx: x quantized per row and block of 32 by gemm_w4's fast-mode rule (docs/numerics.md:
// dx = amax / 127, xq = clamp(rne(x / dx), -127, 127)). Mul then add, no FMA: the same bits on
// every ISA and thread count. The amx level computes D on the tile unit from 16 rows of x
// (amx.cpp); AVX-512 / AVX2 decode a block once for many rows of x.
//
// Operands. codes uint8 packed in blocks of 16 rows and groups of 4 vectors, `packed4`
// (ceil(n / 16), nv / 4, 16, 4): packed4[b][q][l][t] = code of row 16 b + l, vector 4 q + t (rows
// past n: code 0, dropped). With `nibbles` (kc <= 16, nv a multiple of 8) two codes share a
// byte, (ceil(n / 16), nv / 8, 16, 4): byte [b][h][l][t] = code (row 16 b + l, vector 8 h + t)
// | code (same row, vector 8 h + 4 + t) << 4: half the bytes. books8 (groups, kc, dim) int8,
// bs (groups) float32, scales null or (n, nseg) float32 with K / nseg a multiple of 32
// columns, bias null or (n).
// Shapes (vq8_supported): dim 2, 4 or 8; K = nv dim a multiple of 32; kc <= 256 (128 at dim
// 8); group_rows a multiple of 16 or one codebook.
// A code >= kc raises std::invalid_argument (no out-of-range read: register tables wrap).
// Returns true when x holds NaN/Inf (y is then unspecified), as gemm_w4's fast mode.
#pragma once
#include <cstdint>

namespace qk {

constexpr int64_t kVq8Rows = 16;  // rows per block
constexpr int64_t kVq8Group = 4;  // vectors per 64-byte group of a block

bool vq8_supported(int64_t n, int64_t nv, int64_t groups, int64_t kc, int64_t dim,
                   int64_t group_rows, int64_t nseg);
// Whether the 4-bit layout serves this shape (kc <= 16, nv % 8 == 0, vq8_supported).
bool vq8_nibbles_fit(int64_t n, int64_t nv, int64_t groups, int64_t kc, int64_t dim,
                     int64_t group_rows, int64_t nseg);

// The codebook byte planes the kernels look codes up in: tables (groups, dim, 256) int8,
// tables[g][d][c] = books8[g][c][d] for c < kc, 0 past kc.
void vq8_tables(const int8_t* books8, int64_t groups, int64_t kc, int64_t dim, int8_t* tables);

// tables: vq8_tables(books8, ...) built once by the caller, or null (built on every call).
bool gemm_vq8(const float* x, int64_t m, const uint8_t* packed4, int64_t n, int64_t nv,
              const int8_t* books8, const float* bs, int64_t groups, int64_t kc, int64_t dim,
              int64_t group_rows, const float* scales, int64_t nseg, const float* bias, float* y,
              bool nibbles = false, const int8_t* tables = nullptr);

}  // namespace qk
