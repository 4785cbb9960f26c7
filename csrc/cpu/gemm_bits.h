// 1-bit (binary) and 1.58-bit (ternary) weight matmuls with one scale per output channel.
//
// Packed weights, one row per output channel n, KW = ceil(K / 64) little-endian uint64 words:
//   binary : KW words; bit k % 64 of word k / 64 is 1 when w[n, k] = -1 (0: +1). 8*KW bytes.
//   ternary: 2*KW words, interleaved per 64 weights: word 2i = nonzero mask, word 2i+1 =
//            negative mask (a weight is -1 when both bits are set). 16*KW bytes.
// Bits at k >= K are ignored.
//
//   float activations: y[m, n] = alpha[n] * sum_k w[n, k] x[m, k] (+ bias[n]), sums of +-x in
//                      float32 (order differs per ISA; no multiplies per weight).
//   xnor (binary only): x binarized per row, bit = (x < 0) (so 0 and -0.0 give +1), beta[m] =
//                      float32(sum |x[m]| in float64, in index order / K) (0 for a zero row);
//                      y = float(K - 2*popcount(xbits ^ wbits)) * (alpha[n] * beta[m]) (+ bias[n]),
//                      bit-identical on every ISA and thread count.
#pragma once
#include <cstdint>
#include <cstring>

namespace qk {

inline int64_t bits_words(int64_t K) { return (K + 63) / 64; }

// x (M, K), y (M, N) float32 row-major; alpha (N); bias (N) or null.
void gemm_binary(const float* x, int64_t M, const uint8_t* wbits, const float* alpha,
                 const float* bias, int64_t N, int64_t K, bool xnor, float* y);
void gemm_ternary(const float* x, int64_t M, const uint8_t* wpacked, const float* alpha,
                  const float* bias, int64_t N, int64_t K, float* y);

namespace bits {

// Range kernels over output channels [n0, n1), all M rows. Float kernels read x padded to
// Kp = 64*KW columns (zeros beyond K, so weight padding never matters).
struct Kernels {
  void (*binary_f32)(const float* xp, int64_t M, int64_t KW, const uint8_t* w, const float* alpha,
                     const float* bias, int64_t n0, int64_t n1, int64_t N, float* y);
  void (*ternary_f32)(const float* xp, int64_t M, int64_t KW, const uint8_t* w,
                      const float* alpha, const float* bias, int64_t n0, int64_t n1, int64_t N,
                      float* y);
  // xb: (M, KW) sign words of x, zero padded; beta (M).
  void (*xnor)(const uint64_t* xb, const float* beta, int64_t M, int64_t K, const uint8_t* w,
               const float* alpha, const float* bias, int64_t n0, int64_t n1, int64_t N,
               float* y);
};

extern const Kernels kScalarKernels;
const Kernels* avx2_kernels();  // gemm_bits_avx2.cpp

inline uint64_t load_word(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Valid-bit mask of word i of a K-bit row.
inline uint64_t word_mask(int64_t i, int64_t K) {
  int64_t rem = K - 64 * i;
  return rem >= 64 ? ~uint64_t{0} : (uint64_t{1} << rem) - 1;
}

// The shared epilogues (identical float operations on every path).
inline float epilogue_f32(float acc, const float* alpha, const float* bias, int64_t n) {
  float v = acc * alpha[n];
  return bias ? v + bias[n] : v;
}

inline float epilogue_xnor(int64_t K, int64_t pop, float alpha, float beta, const float* bias,
                           int64_t n) {
  float v = static_cast<float>(K - 2 * pop) * (alpha * beta);
  return bias ? v + bias[n] : v;
}

}  // namespace bits
}  // namespace qk
