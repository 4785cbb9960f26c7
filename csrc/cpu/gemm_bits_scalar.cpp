// Scalar reference kernels of the binary / ternary matmuls (see gemm_bits.h).
#include "cpu/gemm_bits.h"

namespace qk {
namespace bits {
namespace {

// x with its sign flipped when `neg` (exact: no multiply).
inline float flip(float x, uint64_t neg) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u ^= static_cast<uint32_t>(neg & 1) << 31;
  std::memcpy(&x, &u, 4);
  return x;
}

void binary_f32_scalar(const float* xp, int64_t M, int64_t KW, const uint8_t* w,
                       const float* alpha, const float* bias, int64_t n0, int64_t n1, int64_t N,
                       float* y) {
  const int64_t Kp = 64 * KW;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * 8 * KW;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = xp + m * Kp;
      float acc = 0.0f;
      for (int64_t i = 0; i < KW; ++i) {
        uint64_t b = load_word(wr + 8 * i);
        for (int j = 0; j < 64; ++j) acc += flip(xr[64 * i + j], b >> j);
      }
      y[m * N + n] = epilogue_f32(acc, alpha, bias, n);
    }
  }
}

void ternary_f32_scalar(const float* xp, int64_t M, int64_t KW, const uint8_t* w,
                        const float* alpha, const float* bias, int64_t n0, int64_t n1, int64_t N,
                        float* y) {
  const int64_t Kp = 64 * KW;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * 16 * KW;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = xp + m * Kp;
      float acc = 0.0f;
      for (int64_t i = 0; i < KW; ++i) {
        uint64_t nz = load_word(wr + 16 * i), ng = load_word(wr + 16 * i + 8);
        for (int j = 0; j < 64; ++j)
          if ((nz >> j) & 1) acc += flip(xr[64 * i + j], ng >> j);
      }
      y[m * N + n] = epilogue_f32(acc, alpha, bias, n);
    }
  }
}

// Portable popcount (SWAR): this file is built without -mpopcnt.
inline int64_t popcount64(uint64_t v) {
  v = v - ((v >> 1) & 0x5555555555555555ULL);
  v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
  v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
  return static_cast<int64_t>((v * 0x0101010101010101ULL) >> 56);
}

void xnor_scalar(const uint64_t* xb, const float* beta, int64_t M, int64_t K, const uint8_t* w,
                 const float* alpha, const float* bias, int64_t n0, int64_t n1, int64_t N,
                 float* y) {
  const int64_t KW = bits_words(K);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * 8 * KW;
    for (int64_t m = 0; m < M; ++m) {
      const uint64_t* xr = xb + m * KW;
      int64_t pop = 0;
      for (int64_t i = 0; i < KW; ++i)
        pop += popcount64((xr[i] ^ load_word(wr + 8 * i)) & word_mask(i, K));
      y[m * N + n] = epilogue_xnor(K, pop, alpha[n], beta[m], bias, n);
    }
  }
}

}  // namespace

const Kernels kScalarKernels = {binary_f32_scalar, ternary_f32_scalar, xnor_scalar};

}  // namespace bits
}  // namespace qk
