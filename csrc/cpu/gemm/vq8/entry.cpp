// gemm_vq8 entry point (api.h): activation quantization (gemm_w4's rule, on the pool), the
// activation words and codebook planes, then tasks of whole 16-row blocks on the pool (each
// output computed by one task, the same way whatever the split).
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/gemm/tile/driver.h"
#include "cpu/gemm/vq8/kernels.h"

namespace qk {

bool vq8_supported(int64_t n, int64_t nv, int64_t groups, int64_t kc, int64_t dim,
                   int64_t group_rows, int64_t nseg) {
  if (dim != 2 && dim != 4 && dim != 8) return false;
  const int64_t k = nv * dim;
  if (n < 0 || nv < 0 || k % 32 || kc < 1 || kc > (dim == 8 ? 128 : 256)) return false;
  if (group_rows < 1 || (groups > 1 && group_rows % kVq8Rows)) return false;
  return nseg >= 1 && (k / 32) % nseg == 0;
}

bool vq8_nibbles_fit(int64_t n, int64_t nv, int64_t groups, int64_t kc, int64_t dim,
                     int64_t group_rows, int64_t nseg) {
  return kc <= 16 && nv % 8 == 0 && vq8_supported(n, nv, groups, kc, dim, group_rows, nseg);
}

namespace {

// Word [q][d] of x row i: bytes xq[(4 q + t) dim + d], t = 0..3 (kernels.h Problem).
void activation_words(const int8_t* xq, int64_t m, int64_t nv, int64_t dim, uint32_t* xp) {
  const int64_t nq = nv / kVq8Group, k = nv * dim;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t q = 0; q < nq; ++q)
      for (int64_t d = 0; d < dim; ++d) {
        uint32_t w = 0;
        for (int64_t t = 0; t < kVq8Group; ++t)
          w |= static_cast<uint32_t>(static_cast<uint8_t>(xq[i * k + (4 * q + t) * dim + d]))
               << (8 * t);
        xp[(i * nq + q) * dim + d] = w;
      }
}

}  // namespace

void vq8_tables(const int8_t* books8, int64_t groups, int64_t kc, int64_t dim, int8_t* tables) {
  std::fill(tables, tables + groups * dim * 256, int8_t{0});
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t c = 0; c < kc; ++c)
      for (int64_t d = 0; d < dim; ++d)
        tables[(g * dim + d) * 256 + c] = books8[(g * kc + c) * dim + d];
}

bool gemm_vq8(const float* x, int64_t m, const uint8_t* packed4, int64_t n, int64_t nv,
              const int8_t* books8, const float* bs, int64_t groups, int64_t kc, int64_t dim,
              int64_t group_rows, const float* scales, int64_t nseg, const float* bias,
              float* y, bool nibbles, const int8_t* tables) {
  if (!scales) nseg = 1;
  if (!vq8_supported(n, nv, groups, kc, dim, group_rows, nseg))
    throw std::invalid_argument("gemm_vq8: unsupported shape (api.h vq8_supported)");
  if (nibbles && !vq8_nibbles_fit(n, nv, groups, kc, dim, group_rows, nseg))
    throw std::invalid_argument("gemm_vq8: 4-bit codes need kc <= 16 and nv % 8 == 0");
  if (m == 0 || n == 0) return false;
  const int64_t k = nv * dim, nb = (n + kVq8Rows - 1) / kVq8Rows;
  const bool parallel = tdrv::worth_parallel(m * n * k, true);
  AlignedVector<int8_t> xq;
  std::vector<float> dx, xs;
  if (tdrv::quantize_activations(x, m, k, parallel, xq, dx, xs)) return true;
  std::vector<uint32_t> xp(static_cast<size_t>(m * (nv / kVq8Group) * dim));
  activation_words(xq.data(), m, nv, dim, xp.data());
  std::vector<int8_t> own;
  if (!tables) {
    own.resize(static_cast<size_t>(groups * dim * 256));
    vq8_tables(books8, groups, kc, dim, own.data());
    tables = own.data();
  }
  const vq8::Problem p{xp.data(), dx.data(), xs.data(), m,      nv,    dim,   kc,
                       k / 32,    packed4,   nibbles,   tables, scales, n, nseg, groups,
                       group_rows};
  auto store = [&](int64_t b, const float* out) {
    const float s = bs[groups == 1 ? 0 : b * kVq8Rows / group_rows];
    for (int64_t i = 0; i < m; ++i)
      for (int64_t l = 0; l < kVq8Rows && b * kVq8Rows + l < n; ++l) {
        const int64_t r = b * kVq8Rows + l;
        const float v = out[i * kVq8Rows + l] * s;
        y[i * n + r] = bias ? v + bias[r] : v;
      }
  };
  const vq8::Kernels& kern = vq8::kernels();
  uint32_t top = 0;
  if (kern.call && kern.fits(p)) {
    top = kern.call(p, parallel, store);
  } else {
    const int64_t tasks = parallel ? std::min<int64_t>(nb, 64) : 1;
    std::vector<uint32_t> tops(static_cast<size_t>(tasks), 0);
    tdrv::run_tasks(tasks, parallel, [&](int64_t ti) {
      std::vector<float> out(static_cast<size_t>(m * kVq8Rows));
      for (int64_t b = nb * ti / tasks; b < nb * (ti + 1) / tasks; ++b) {
        tops[ti] = std::max(tops[ti], kern.block(p, b, vq8::block_tables(p, b), out.data()));
        store(b, out.data());
      }
    });
    top = *std::max_element(tops.begin(), tops.end());
  }
  if (top >= static_cast<uint64_t>(kc))
    throw std::invalid_argument("gemm_vq8: code " + std::to_string(top) +
                                " is out of range for a codebook of " + std::to_string(kc) +
                                " entries");
  return false;
}

}  // namespace qk
