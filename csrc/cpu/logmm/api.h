// Log-domain matmul (LNS multiply-accumulate): out[m, n] = xs[m] * ws[n] *
//   sum_k sign_x sign_w base^(e_x[m, k] + e_w[n, k]),   base = 2^(1 / 2^f).
// Operands are sign-magnitude log codes (the layout of the log2_<b> formats,
// python/qkern/formats.py): bit b-1 is the sign, the low b-1 bits an index i; i = 0 is zero,
// i >= 1 is base^(i - (2^(b-1) - 1)) (exponents 1 - kmax .. 0). A product adds the two
// exponents as integers; s = e_x + e_w splits into an integer part s >> f (a shift: the float
// exponent field) and an f-bit fraction s & (2^f - 1) looked up in a table of 2^(j / 2^f)
// (float32), as in LNS hardware. Products whose integer part is below -126 (under float32's
// normal range; at most 2^-126 of the largest product) are dropped. The products are summed in
// float32 in k order (no FMA), then multiplied by xs[m], then by ws[n]: every ISA and thread
// count gives the same bits. Torch-free.
#pragma once
#include <cstdint>

namespace qk {

// xc: (M, K) codes of bx bits; wc: (N, K) codes of bw bits (2..8); xs: (M,), ws: (N,) float32
// scales; out: (M, N) float32; frac_bits f in [0, 6].
void logmm_f32(const uint8_t* xc, const uint8_t* wc, const float* xs, const float* ws,
               float* out, int64_t M, int64_t N, int64_t K, int bx, int bw, int frac_bits);

}  // namespace qk
