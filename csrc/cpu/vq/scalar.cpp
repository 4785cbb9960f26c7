// The reference VQ kernels (api.h): the float operations every ISA performs, in order.
#include "cpu/vq/kernels.h"

namespace qk {
namespace vq {

void assign_scalar(const float* x, int64_t n, const Packed& c, int64_t* idx, float* v) {
  const int64_t d = c.d;
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * c.ldx;
    float best = __builtin_inff();
    int64_t bj = 0;
    for (int64_t j = 0; j < c.k; ++j) {
      const float* cj = c.raw + j * d;
      float s = 0.0f;
      for (int64_t t = 0; t < d; ++t) s = s + xi[t] * cj[t];
      const float val = c.norms[j] - 2.0f * s;
      if (val < best) {
        best = val;
        bj = j;
      }
    }
    idx[i] = bj;
    v[i] = best;
  }
}

void topk_scalar(const float* x, int64_t n, const Packed& c, int64_t kk, int64_t* idx,
                 float* v) {
  const int64_t d = c.d;
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * c.ldx;
    float* rv = v + i * kk;
    int64_t* ri = idx + i * kk;
    topk_init(rv, ri, kk, c.k);
    for (int64_t j = 0; j < c.k; ++j) {
      const float* cj = c.raw + j * d;
      float s = 0.0f;
      for (int64_t t = 0; t < d; ++t) s = s + xi[t] * cj[t];
      topk_offer(rv, ri, kk, c.norms[j] - 2.0f * s, j);
    }
  }
}

void table_scalar(const float* q, int64_t m, int64_t ksub, int64_t dsub, const float* cb,
                  const float*, float* table) {
  for (int64_t j = 0; j < m; ++j)
    for (int64_t c = 0; c < ksub; ++c) {
      const float* cc = cb + (j * ksub + c) * dsub;
      const float* qq = q + j * dsub;
      float s = 0.0f;
      for (int64_t t = 0; t < dsub; ++t) {
        const float e = qq[t] - cc[t];
        s = s + e * e;
      }
      table[j * ksub + c] = s;
    }
}

namespace {

// One query's table over n codes (kept apart from the loop over queries: GCC compiles it to
// a faster loop that way).
template <class Code>
__attribute__((noinline)) void scan_one(const float* table, int64_t ksub, const Code* codes,
                                        int64_t n, int64_t m, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const Code* c = codes + i * m;
    float s = 0.0f;
    for (int64_t j = 0; j < m; ++j) s = s + table[j * ksub + c[j]];
    out[i] = s;
  }
}

template <class Code>
void scan_rows(const float* tables, int64_t nq, int64_t ksub, const Code* codes, int64_t n,
               int64_t m, float* dist, int64_t ld) {
  for (int64_t q = 0; q < nq; ++q)
    scan_one(tables + q * m * ksub, ksub, codes, n, m, dist + q * ld);
}

}  // namespace

void scan_scalar(const float* tables, int64_t nq, int64_t ksub, const uint8_t* codes, int64_t n,
                 int64_t m, float* dist, int64_t ld) {
  scan_rows(tables, nq, ksub, codes, n, m, dist, ld);
}

void scan_scalar(const float* tables, int64_t nq, int64_t ksub, const uint16_t* codes,
                 int64_t n, int64_t m, float* dist, int64_t ld) {
  scan_rows(tables, nq, ksub, codes, n, m, dist, ld);
}

void dots_scalar(const float* x, int64_t n, const Packed& c, float* out, int64_t ld) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c.k; ++j) {
      const float* xi = x + i * c.ldx;
      const float* cj = c.raw + j * c.d;
      float s = 0.0f;
      for (int64_t t = 0; t < c.d; ++t) s = s + xi[t] * cj[t];
      out[i * ld + j] = s;
    }
}

namespace {

constexpr int64_t kSumBlock = 256;

// s[c] = 0 + rows[0][c0 + c] + ... + rows[nrows - 1][c0 + c] in that order, c < len: the sums
// row by row, a block of entries at a time (lut_argmin).
void block_sums(const float* const* rows, int64_t nrows, int64_t c0, int64_t len, float* s) {
  for (int64_t c = 0; c < len; ++c) s[c] = 0.0f;
  for (int64_t r = 0; r < nrows; ++r)
    for (int64_t c = 0; c < len; ++c) s[c] = s[c] + rows[r][c0 + c];
}

}  // namespace

int64_t lut_argmin_scalar(const float* u, const float* const* rows, int64_t nrows, int64_t k) {
  float best = __builtin_inff();
  int64_t bidx = 0;
  float s[kSumBlock];
  for (int64_t c0 = 0; c0 < k; c0 += kSumBlock) {
    const int64_t len = std::min(kSumBlock, k - c0);
    block_sums(rows, nrows, c0, len, s);
    for (int64_t c = 0; c < len; ++c) {
      const float val = u[c0 + c] + 2.0f * s[c];
      if (val < best) {
        best = val;
        bidx = c0 + c;
      }
    }
  }
  return bidx;
}

void beam_offer_scalar(const float* s, int64_t k, const float* t, float db, int64_t base,
                       float* v, int64_t* idx, int64_t kk) {
  for (int64_t c = 0; c < k; ++c) {
    const float x = (db + t[c]) + 2.0f * s[c];
    if (x <= v[kk - 1]) topk_offer(v, idx, kk, x, base + c);
  }
}

void row_add_scalar(const float* a, const float* b, int64_t k, float* out) {
  for (int64_t c = 0; c < k; ++c) out[c] = a[c] + b[c];
}

float beam_bound_scalar(const float* s, int64_t k, const float* t, float db, int64_t kk) {
  if (kk > std::min<int64_t>(k, 16)) return __builtin_inff();
  float lo[16];
  std::fill(lo, lo + 16, __builtin_inff());
  for (int64_t c = 0; c < k; ++c) {
    const float x = (db + t[c]) + 2.0f * s[c];
    if (x < lo[c & 15]) lo[c & 15] = x;
  }
  return kth_of_16(lo, kk);
}

const Kernels kScalarKernels = {assign_scalar,   topk_scalar, table_scalar,
                                 scan_scalar,     scan_scalar, dots_scalar,
                                 lut_argmin_scalar, beam_offer_scalar, row_add_scalar,
                                 beam_bound_scalar};

}  // namespace vq
}  // namespace qk
