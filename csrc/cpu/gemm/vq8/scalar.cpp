// Scalar gemm_vq8 (api.h): the definition, written out.
#include "cpu/gemm/vq8/kernels.h"

namespace qk {
namespace vq8 {
namespace {

// Byte t of activation word [q][d] of x row i, as the signed code.
int32_t x_code(const Problem& p, int64_t i, int64_t v, int64_t d) {
  const uint32_t w = p.xp[(i * (p.nv / kVq8Group) + v / kVq8Group) * p.dim + d];
  return static_cast<int8_t>(static_cast<uint8_t>(w >> (8 * (v % kVq8Group))));
}

uint32_t block_scalar(const Problem& p, int64_t b, const int8_t* tab, float* out) {
  const int64_t cols = 32;
  const uint8_t* codes = p.packed4 + b * block_bytes(p);
  uint32_t top = 0;
  for (int64_t i = 0; i < p.m; ++i) {
    for (int64_t l = 0; l < kVq8Rows; ++l) {
      float acc = 0.0f;
      for (int64_t blk = 0; blk < p.nblk; ++blk) {
        int32_t dot = 0;
        for (int64_t k = blk * cols; k < (blk + 1) * cols; ++k) {
          const int64_t v = k / p.dim, d = k % p.dim;
          const uint32_t c = code_at(p, codes, v / kVq8Group, l, v % kVq8Group);
          top = c > top ? c : top;
          dot += tab[d * 256 + c] * x_code(p, i, v, d);
        }
        const float t = p.dx[i * p.nblk + blk] * row_scale(p, b * kVq8Rows + l, blk);
        acc = acc + static_cast<float>(dot) * t;
      }
      out[i * kVq8Rows + l] = acc;
    }
  }
  return top;
}

}  // namespace

const Kernels kScalarKernels = {block_scalar, nullptr, nullptr};

}  // namespace vq8
}  // namespace qk
