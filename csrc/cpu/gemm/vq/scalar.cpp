// Scalar reference loops of gemm_vq (api.h float contract; -ffp-contract=off: no FMA).
#include "cpu/gemm/vq/kernels.h"

namespace qk {
namespace vqmm {
namespace {

void build(const float* x, int64_t nvt, int64_t dim, const float* bookt, int64_t kc,
           float* lut) {
  for (int64_t v = 0; v < nvt; ++v)
    for (int64_t c = 0; c < kc; ++c) {
      float t = x[v * dim] * bookt[c];
      for (int64_t d = 1; d < dim; ++d) t = t + x[v * dim + d] * bookt[d * kc + c];
      lut[v * kc + c] = t;
    }
}

template <class Code>
uint32_t acc(const float* lut, int64_t kc, int64_t nvt, const Code* codes, int64_t v0,
             float* chains) {
  uint32_t top = 0;
  for (int64_t l = 0; l < kVqRows; ++l)
    for (int64_t v = 0; v < nvt; ++v) {
      const uint32_t c = code_of(codes, v, l);
      top = c > top ? c : top;
      float& p = chains[((v0 + v) & 3) * kVqRows + l];
      p = p + lut[v * kc + (c < kc ? c : kc - 1)];
    }
  return top;
}

template <class Code>
uint32_t lane(const float* x, int64_t nvt, int64_t dim, const Code* codes, int64_t kc,
              const float* books, const int32_t* base, int64_t v0, float* chains) {
  uint32_t top = 0;
  for (int64_t l = 0; l < kVqRows; ++l)
    for (int64_t v = 0; v < nvt; ++v) {
      const uint32_t c = code_of(codes, v, l);
      top = c > top ? c : top;
      const float* e = books + base[l] + (c < kc ? c : kc - 1) * dim;
      float t = e[0] * x[v * dim];
      for (int64_t d = 1; d < dim; ++d) t = t + e[d] * x[v * dim + d];
      float& p = chains[((v0 + v) & 3) * kVqRows + l];
      p = p + t;
    }
  return top;
}

// The rows path (api.h): 32 partial sums, P[e % 32] += w[e] x[e], then the tree
// P[j] + P[j + h] for h = 16, 8, 4, 2, 1.
template <int kDim, class Code>
void rows_dim(const float* x, int64_t len, const Code* codes, const float* books,
              const int64_t* off, float* part) {
  for (int64_t l = 0; l < kVqRows; ++l) {
    float p[32] = {};
    for (int64_t e = 0; e < len; ++e) {
      const float w = books[off[l] + codes[e / kDim * kVqRows + l] * kDim + e % kDim];
      p[e % 32] = p[e % 32] + w * x[e];
    }
    for (int64_t h = 16; h >= 1; h /= 2)
      for (int64_t j = 0; j < h; ++j) p[j] = p[j] + p[j + h];
    part[l] = p[0];
  }
}

template <class Code>
uint32_t rows(const float* x, int64_t len, int64_t dim, const Code* codes, int64_t kc,
              const float* books, const int64_t* off, float* part) {
  const uint32_t top = max_code(codes, len / dim * kVqRows);
  if (top >= static_cast<uint64_t>(kc)) return top;
  if (dim == 2) rows_dim<2>(x, len, codes, books, off, part);
  if (dim == 4) rows_dim<4>(x, len, codes, books, off, part);
  if (dim == 8) rows_dim<8>(x, len, codes, books, off, part);
  return top;
}

template <class Code>
constexpr CodeKernels<Code> code_kernels() {
  return {acc<Code>, lane<Code>, nullptr, rows<Code>};
}

}  // namespace

const Kernels kScalarKernels = {build, 0, code_kernels<uint8_t>(), code_kernels<uint16_t>(),
                                 {acc<Nib4>, nullptr, nullptr, nullptr}};

}  // namespace vqmm
}  // namespace qk
