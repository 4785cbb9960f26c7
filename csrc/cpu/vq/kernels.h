// Internal interface of the VQ kernels (api.h): the per-ISA kernel table and the packed
// centroid layout the SIMD assignment reads.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/runtime/aligned.h"
#include "cpu/runtime/isa.h"
#include "cpu/vq/api.h"

namespace qk {
namespace vq {

// Centroids are packed in panels of kPanel: panel p holds centroids p*kPanel .. p*kPanel+15 as
// (d, kPanel) (coordinate-major), so a SIMD load reads one coordinate of 16 centroids. The
// missing centroids of the last panel are zero with norm +inf (never chosen).
constexpr int64_t kPanel = 16;

struct Packed {
  const float* panels;  // (ceil(k / kPanel), d, kPanel)
  const float* norms;   // (ceil(k / kPanel) * kPanel): ||c_j||^2, +inf past k
  const float* raw;     // (k, d) as given
  int64_t k, d;
  int64_t ldx;  // row stride of the x the kernels read (>= d: d coordinates of a longer row)
};

struct Kernels {
  // rows [0, n) of x (row stride c.ldx): best index and v_best = ||c||^2 - 2 x.c (api.h).
  void (*assign)(const float* x, int64_t n, const Packed& c, int64_t* idx, float* v);
  // rows [0, n) of x: the kk smallest v = ||c||^2 - 2 x.c, ascending (ties: lower index), in
  // idx / v (n, kk) (api.h vq_topk; kk <= k).
  void (*topk)(const float* x, int64_t n, const Packed& c, int64_t kk, int64_t* idx, float* v);
  // one query: table (m, ksub) from codebooks (m, ksub, dsub) and its transpose cbt
  // (m, dsub, ksub).
  void (*adc_table)(const float* q, int64_t m, int64_t ksub, int64_t dsub, const float* cb,
                    const float* cbt, float* table);
  // nq queries' tables (nq, m, ksub) against codes (n, m): dist row q at dist + q * ld.
  void (*scan_u8)(const float* tables, int64_t nq, int64_t ksub, const uint8_t* codes,
                  int64_t n, int64_t m, float* dist, int64_t ld);
  void (*scan_u16)(const float* tables, int64_t nq, int64_t ksub, const uint16_t* codes,
                   int64_t n, int64_t m, float* dist, int64_t ld);
  // rows [0, n) of x: out[i * ld + j] = x_i . c_j for j < k (sequential over t, mul then add;
  // the dot products of assign / topk).
  void (*dots)(const float* x, int64_t n, const Packed& c, float* out, int64_t ld);
  // The ICM choice of one codebook for one vector (api.h icm_encode): the lowest c < k with the
  // smallest u[c] + 2 * s_c, s_c = the float32 sum 0 + rows[0][c] + ... + rows[nrows-1][c] in
  // that order (mul by 2 exact, so FMA-proof); c replaces the running best (start: +inf, 0)
  // only when strictly smaller (NaN never chosen).
  int64_t (*lut_argmin)(const float* u, const float* const* rows, int64_t nrows, int64_t k);
  // One beam entry's offers in rq_beam_encode (api.h): for c < k the value
  // (db + t[c]) + 2 * s[c] (s: the entry's prefix sums, row_add), offered to the top-kk list
  // (v, idx) as entry base + c (topk_offer: ascending, equal values by entry); a value above the
  // list's current last one is never offered.
  void (*beam_offer)(const float* s, int64_t k, const float* t, float db, int64_t base, float* v,
                     int64_t* idx, int64_t kk);
  // out[c] = a[c] + b[c], c < k (float32; the prefix sums of rq_beam_encode).
  void (*row_add)(const float* a, const float* b, int64_t k, float* out);
  // An upper bound on the kk-th smallest of one entry's beam_offer values (c < k): the kk-th
  // smallest of the minima of the 16 classes c mod 16 (kk distinct candidates lie at or below
  // it; a NaN is never a minimum); +inf when kk > min(k, 16).
  float (*beam_bound)(const float* s, int64_t k, const float* t, float db, int64_t kk);
};

extern const Kernels kScalarKernels;  // scalar.cpp
const Kernels* avx2_kernels();        // avx2.cpp
const Kernels* avx512_kernels();      // avx512.cpp

inline const Kernels& kernels() {
  const Kernels* const by_isa[] = {&kScalarKernels, avx2_kernels(), avx512_kernels()};
  return pick(by_isa);
}

// The reference loops (scalar.cpp), used by the SIMD paths for their tails.
void assign_scalar(const float* x, int64_t n, const Packed& c, int64_t* idx, float* v);
void topk_scalar(const float* x, int64_t n, const Packed& c, int64_t kk, int64_t* idx,
                 float* v);
void dots_scalar(const float* x, int64_t n, const Packed& c, float* out, int64_t ld);
int64_t lut_argmin_scalar(const float* u, const float* const* rows, int64_t nrows, int64_t k);
float beam_bound_scalar(const float* s, int64_t k, const float* t, float db, int64_t kk);
void beam_offer_scalar(const float* s, int64_t k, const float* t, float db, int64_t base,
                       float* v, int64_t* idx, int64_t kk);
void row_add_scalar(const float* a, const float* b, int64_t k, float* out);
void table_scalar(const float* q, int64_t m, int64_t ksub, int64_t dsub, const float* cb,
                  const float* cbt, float* table);
// The reference scans (scalar.cpp; the SIMD files call these rather than compile the loop
// themselves: GCC vectorizes it with gathers there, which measured slower).
void scan_scalar(const float* tables, int64_t nq, int64_t ksub, const uint8_t* codes, int64_t n,
                 int64_t m, float* dist, int64_t ld);
void scan_scalar(const float* tables, int64_t nq, int64_t ksub, const uint16_t* codes,
                 int64_t n, int64_t m, float* dist, int64_t ld);

// The SIMD assignment (avx2.cpp, avx512.cpp): V is a float vector type of V::kW lanes with
// load/store/add/sub/mul/set1, plus V::I (index vector), lt(a, b) -> mask, blend(mask, a, b)
// (b where mask) for values and indices, seq(base) (base, base+1, ...), le(a, b) -> mask and
// bits(mask) -> the lanes' bits (topk_block), pick(a, b, c, d) -> (a, b) the lexicographic
// minimum of (a, b) and (c, d) lane by lane, butterfly(a, b) -> every lane the minimum over
// all (lanes_argmin). kPanel / V::kW
// vectors per panel, R rows at a time (V::kRows: what its registers hold); the per-lane
// running minimum keeps the lowest index (strict <, panels in ascending order), the lanes are
// reduced at the end the same way.
// acc[r][u] = x_r . c_j for the kPanel centroids j of panel p (sequential over t, mul then add).
template <class V, int R>
inline void panel_dots(const float* x, const Packed& c, int64_t p,
                       typename V::T (&acc)[R][kPanel / V::kW]) {
  constexpr int kV = static_cast<int>(kPanel / V::kW);
  const int64_t d = c.d;
  const float* pan = c.panels + p * d * kPanel;
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < kV; ++u) acc[r][u] = V::set1(0.0f);
  for (int64_t t = 0; t < d; ++t) {
    typename V::T cv[kV];
    for (int u = 0; u < kV; ++u) cv[u] = V::load(pan + t * kPanel + u * V::kW);
    for (int r = 0; r < R; ++r) {
      const typename V::T xv = V::set1(x[r * c.ldx + t]);
      for (int u = 0; u < kV; ++u) acc[r][u] = V::add(acc[r][u], V::mul(xv, cv[u]));
    }
  }
}

// The lexicographic minimum (value, index) over every lane of v[0..n), i[0..n) (no NaN in v),
// without branches: the vectors folded lane by lane, then the lanes.
template <class V>
inline void lanes_argmin(const typename V::T* v, const typename V::I* i, int n, float* best,
                         int32_t* idx) {
  typename V::T a = v[0];
  typename V::I b = i[0];
  for (int u = 1; u < n; ++u) V::pick(a, b, v[u], i[u]);
  V::butterfly(a, b);
  alignas(64) float fv[V::kW];
  alignas(64) int32_t fi[V::kW];
  V::store(fv, a);
  V::storei(fi, b);
  *best = fv[0];
  *idx = fi[0];
}

template <class V, int R>
inline void assign_block(const float* x, const Packed& c, int64_t* idx, float* v) {
  constexpr int kV = static_cast<int>(kPanel / V::kW);
  const int64_t panels = (c.k + kPanel - 1) / kPanel;
  typename V::T bv[R][kV];
  typename V::I bi[R][kV];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < kV; ++u) {
      bv[r][u] = V::set1(__builtin_inff());
      bi[r][u] = V::seq(u * V::kW);
    }
  const typename V::T two = V::set1(2.0f);
  for (int64_t p = 0; p < panels; ++p) {
    typename V::T acc[R][kV];
    panel_dots<V, R>(x, c, p, acc);
    for (int u = 0; u < kV; ++u) {
      const typename V::T cn = V::load(c.norms + p * kPanel + u * V::kW);
      const typename V::I ix = V::seq(p * kPanel + u * V::kW);
      for (int r = 0; r < R; ++r) {
        const typename V::T val = V::sub(cn, V::mul(two, acc[r][u]));
        const auto m = V::lt(val, bv[r][u]);
        bv[r][u] = V::blend(m, bv[r][u], val);
        bi[r][u] = V::blendi(m, bi[r][u], ix);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float best;
    int32_t bidx;
    lanes_argmin<V>(bv[r], bi[r], kV, &best, &bidx);
    idx[r] = bidx < c.k ? bidx : 0;
    v[r] = best;
  }
}

// The per-row top-kk list (api.h vq_topk): v / idx (kk) ascending by (value, index), initially
// (+inf, k). Offers value `val` of centroid j: kept when it sorts before the last entry.
inline void topk_offer(float* v, int64_t* idx, int64_t kk, float val, int64_t j) {
  if (!(val < v[kk - 1] || (val == v[kk - 1] && j < idx[kk - 1]))) return;
  int64_t pos = kk - 1;
  while (pos > 0 && (v[pos - 1] > val || (v[pos - 1] == val && idx[pos - 1] > j))) {
    v[pos] = v[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  v[pos] = val;
  idx[pos] = j;
}

// The kk-th smallest (1 <= kk <= 16) of 16 class minima (beam_bound): the least value with
// kk of the 16 at or below it (no NaN among them), counted without branches.
inline float kth_of_16(const float* lo, int64_t kk) {
  float out = __builtin_inff();
  for (int i = 0; i < 16; ++i) {
    int at_or_below = 0;
    for (int j = 0; j < 16; ++j) at_or_below += lo[j] <= lo[i];
    out = at_or_below >= kk && lo[i] < out ? lo[i] : out;
  }
  return out;
}

inline void topk_init(float* v, int64_t* idx, int64_t n_entries, int64_t k) {
  for (int64_t e = 0; e < n_entries; ++e) {
    v[e] = __builtin_inff();
    idx[e] = k;
  }
}

// The assignment's register blocking with a top-kk list per row instead of the running
// minimum: each panel's values (computed as assign_block does) are compared with the row's
// current kk-th value (V::le, V::bits: a lane mask), the lanes that may enter offered in index
// order.
template <class V, int R>
inline void topk_block(const float* x, const Packed& c, int64_t kk, int64_t* idx, float* v) {
  constexpr int kV = static_cast<int>(kPanel / V::kW);
  const int64_t panels = (c.k + kPanel - 1) / kPanel;
  topk_init(v, idx, R * kk, c.k);
  const typename V::T two = V::set1(2.0f);
  for (int64_t p = 0; p < panels; ++p) {
    typename V::T acc[R][kV];
    panel_dots<V, R>(x, c, p, acc);
    const int64_t lanes = std::min<int64_t>(kPanel, c.k - p * kPanel);
    const uint32_t live = lanes >= 32 ? ~0u : (1u << lanes) - 1;
    for (int r = 0; r < R; ++r) {
      float* rv = v + r * kk;
      int64_t* ri = idx + r * kk;
      // The lanes at or below the row's current kk-th value (a mask, most panels none), then
      // offered in lane order, each re-checked: the kk-th value only decreases.
      const typename V::T thr = V::set1(rv[kk - 1]);
      typename V::T val[kV];
      uint32_t cand = 0;
      for (int u = 0; u < kV; ++u) {
        val[u] = V::sub(V::load(c.norms + p * kPanel + u * V::kW), V::mul(two, acc[r][u]));
        cand |= V::bits(V::le(val[u], thr)) << (u * V::kW);
      }
      cand &= live;
      if (!cand) continue;
      alignas(64) float fv[kPanel];
      for (int u = 0; u < kV; ++u) V::store(fv + u * V::kW, val[u]);
      for (; cand; cand &= cand - 1) {
        const int l = __builtin_ctz(cand);
        if (fv[l] <= rv[kk - 1]) topk_offer(rv, ri, kk, fv[l], p * kPanel + l);
      }
    }
  }
}

template <class V>
inline void topk_simd(const float* x, int64_t n, const Packed& c, int64_t kk, int64_t* idx,
                      float* v) {
  constexpr int kR = V::kRows;
  int64_t i = 0;
  for (; i + kR <= n; i += kR) 
    topk_block<V, kR>(x + i * c.ldx, c, kk, idx + i * kk, v + i * kk);
  for (; i + 4 <= n; i += 4) 
    topk_block<V, 4>(x + i * c.ldx, c, kk, idx + i * kk, v + i * kk);
  for (; i < n; ++i) 
    topk_block<V, 1>(x + i * c.ldx, c, kk, idx + i * kk, v + i * kk);
}

// The dot products of panel_dots stored: out[r * ld + j] (the last panel's missing lanes not).
template <class V, int R>
inline void dots_block(const float* x, const Packed& c, float* out, int64_t ld) {
  constexpr int kV = static_cast<int>(kPanel / V::kW);
  const int64_t panels = (c.k + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    typename V::T acc[R][kV];
    panel_dots<V, R>(x, c, p, acc);
    const int64_t lanes = std::min<int64_t>(kPanel, c.k - p * kPanel);
    for (int r = 0; r < R; ++r) {
      float* o = out + r * ld + p * kPanel;
      if (lanes == kPanel) {
        for (int u = 0; u < kV; ++u) V::store(o + u * V::kW, acc[r][u]);
        continue;
      }
      alignas(64) float fv[kPanel];
      for (int u = 0; u < kV; ++u) V::store(fv + u * V::kW, acc[r][u]);
      for (int64_t l = 0; l < lanes; ++l) o[l] = fv[l];
    }
  }
}

template <class V>
inline void dots_simd(const float* x, int64_t n, const Packed& c, float* out, int64_t ld) {
  constexpr int kR = V::kRows;
  int64_t i = 0;
  for (; i + kR <= n; i += kR) dots_block<V, kR>(x + i * c.ldx, c, out + i * ld, ld);
  for (; i + 4 <= n; i += 4) dots_block<V, 4>(x + i * c.ldx, c, out + i * ld, ld);
  for (; i < n; ++i) dots_block<V, 1>(x + i * c.ldx, c, out + i * ld, ld);
}

template <class V>
inline void assign_simd(const float* x, int64_t n, const Packed& c, int64_t* idx, float* v) {
  constexpr int kR = V::kRows;
  int64_t i = 0;
  for (; i + kR <= n; i += kR) assign_block<V, kR>(x + i * c.ldx, c, idx + i, v + i);
  for (; i + 4 <= n; i += 4) assign_block<V, 4>(x + i * c.ldx, c, idx + i, v + i);
  for (; i < n; ++i) assign_block<V, 1>(x + i * c.ldx, c, idx + i, v + i);
}

}  // namespace vq
}  // namespace qk

namespace qk {
namespace vq {

// The SIMD ADC table of one query: V::kW sub-centroids at a time from the transposed codebooks
// (the same float operations as table_scalar); the last ksub % kW ones scalar.
template <class V>
inline void table_simd(const float* q, int64_t m, int64_t ksub, int64_t dsub, const float* cb,
                       const float* cbt, float* table) {
  const int64_t kv = ksub / V::kW * V::kW;
  for (int64_t j = 0; j < m; ++j) {
    const float* qq = q + j * dsub;
    const float* tj = cbt + j * dsub * ksub;
    for (int64_t c = 0; c < kv; c += V::kW) {
      typename V::T acc = V::set1(0.0f);
      for (int64_t t = 0; t < dsub; ++t) {
        const typename V::T e = V::sub(V::set1(qq[t]), V::load(tj + t * ksub + c));
        acc = V::add(acc, V::mul(e, e));
      }
      V::store(table + j * ksub + c, acc);
    }
    for (int64_t c = kv; c < ksub; ++c) {
      const float* cc = cb + (j * ksub + c) * dsub;
      float s = 0.0f;
      for (int64_t t = 0; t < dsub; ++t) {
        const float e = qq[t] - cc[t];
        s = s + e * e;
      }
      table[j * ksub + c] = s;
    }
  }
}

// The SIMD scan for small tables (ksub <= V::kW: nbits <= 3 on AVX2, <= 4 on AVX-512) and two
// queries or more: V::kW codes at a time, their codes transposed once into a (m, kW) int32
// scratch that every query then reads a column at a time, the table row j in one register and
// the look-up a lane permutation; each lane sums over j in order (as scan_scalar). Larger
// tables (and one query) run the scalar loop: gathering the entries (vpgatherdd / vgatherdps)
// measured no faster than scalar loads (Zen 4), the transposition pays only from 2 queries.
template <class V, class Code>
inline void scan_simd(const float* tables, int64_t nq, int64_t ksub, const Code* codes,
                      int64_t n, int64_t m, float* dist, int64_t ld) {
  int64_t i = 0;
  if (ksub <= V::kW && nq >= 2) {  // the transposition pays from two queries on
    AlignedVector<int32_t> scratch(static_cast<size_t>(m * V::kW));
    int32_t* sc = scratch.data();
    for (; i + V::kW <= n; i += V::kW) {
      for (int64_t l = 0; l < V::kW; ++l)
        for (int64_t j = 0; j < m; ++j) sc[j * V::kW + l] = codes[(i + l) * m + j];
      for (int64_t q = 0; q < nq; ++q) {
        const float* tq = tables + q * m * ksub;
        typename V::T acc = V::set1(0.0f);
        for (int64_t j = 0; j < m; ++j)
          acc = V::add(acc, V::lookup(tq + j * ksub, ksub, V::loadi(sc + j * V::kW)));
        V::store(dist + q * ld + i, acc);
      }
    }
  }
  scan_scalar(tables, nq, ksub, codes + i * m, n - i, m, dist + i, ld);
}

// The ICM choice (Kernels::lut_argmin), 32 entries per step (32 / V::kW vectors: independent
// sums and running minima in flight); per lane the lowest index of the smallest value (strict
// <, ascending c), the lanes reduced by (value, index), the last k % 32 entries scalar.
template <class V>
inline int64_t lut_argmin_simd(const float* u, const float* const* rows, int64_t nrows,
                               int64_t k) {
  constexpr int kV = static_cast<int>(32 / V::kW);
  const int64_t kv = k / 32 * 32;
  float best = __builtin_inff();
  int64_t bidx = 0;
  if (kv > 0) {
    typename V::T bv[kV];
    typename V::I bi[kV];
    for (int w = 0; w < kV; ++w) {
      bv[w] = V::set1(__builtin_inff());
      bi[w] = V::seq(0);
    }
    const typename V::T two = V::set1(2.0f);
    for (int64_t c = 0; c < kv; c += 32) {
      typename V::T s[kV];
      for (int w = 0; w < kV; ++w) s[w] = V::set1(0.0f);
      for (int64_t r = 0; r < nrows; ++r) {
        const float* row = rows[r] + c;
        for (int w = 0; w < kV; ++w) s[w] = V::add(s[w], V::load(row + w * V::kW));
      }
      for (int w = 0; w < kV; ++w) {
        const typename V::T val = V::add(V::load(u + c + w * V::kW), V::mul(two, s[w]));
        const auto lt = V::lt(val, bv[w]);
        bv[w] = V::blend(lt, bv[w], val);
        bi[w] = V::blendi(lt, bi[w], V::seq(c + w * V::kW));
      }
    }
    int32_t i32;
    lanes_argmin<V>(bv, bi, kV, &best, &i32);  // (+inf, 0) when no lane moved, as before
    bidx = i32;
  }
  for (int64_t c = kv; c < k; ++c) {
    float s = 0.0f;
    for (int64_t r = 0; r < nrows; ++r) s = s + rows[r][c];
    const float val = u[c] + 2.0f * s;
    if (val < best) {
      best = val;
      bidx = c;
    }
  }
  return bidx;
}

// Kernels::beam_offer, 4 vectors of entries per step: their values against the list's current
// last one (V::le, V::bits), the lanes that may enter offered in entry order, each re-checked by
// topk_offer; the last k % (4 V::kW) scalar.
template <class V>
inline void beam_offer_simd(const float* s, int64_t k, const float* t, float db, int64_t base,
                            float* v, int64_t* idx, int64_t kk) {
  constexpr int kW = static_cast<int>(V::kW), kStep = 4 * kW;
  const typename V::T two = V::set1(2.0f), vdb = V::set1(db);
  alignas(64) float val[kStep];
  int64_t c = 0;
  for (; c + kStep <= k; c += kStep) {
    typename V::T x[4];
    const typename V::T thr = V::set1(v[kk - 1]);
    uint64_t live = 0;
    for (int w = 0; w < 4; ++w) {
      const int64_t o = c + w * kW;
      x[w] = V::add(V::add(vdb, V::load(t + o)), V::mul(two, V::load(s + o)));
      live |= uint64_t{V::bits(V::le(x[w], thr))} << (w * kW);
    }
    if (!live) continue;
    for (int w = 0; w < 4; ++w) V::store(val + w * kW, x[w]);
    for (; live; live &= live - 1) {
      const int l = __builtin_ctzll(live);
      topk_offer(v, idx, kk, val[l], base + c + l);
    }
  }
  for (; c < k; ++c) {
    const float x = (db + t[c]) + 2.0f * s[c];
    if (x <= v[kk - 1]) topk_offer(v, idx, kk, x, base + c);
  }
}

template <class V>
inline float beam_bound_simd(const float* s, int64_t k, const float* t, float db, int64_t kk) {
  if (kk > std::min<int64_t>(k, 16)) return __builtin_inff();
  constexpr int kA = static_cast<int>(16 / V::kW);  // accumulator a: classes a kW + lane
  const typename V::T two = V::set1(2.0f), vdb = V::set1(db);
  typename V::T lo[kA];
  for (int a = 0; a < kA; ++a) lo[a] = V::set1(__builtin_inff());
  int64_t c = 0;
  for (; c + 16 <= k; c += 16) {
    for (int a = 0; a < kA; ++a) {
      const int64_t o = c + a * V::kW;
      const typename V::T x = V::add(V::add(vdb, V::load(t + o)), V::mul(two, V::load(s + o)));
      lo[a] = V::blend(V::lt(x, lo[a]), lo[a], x);
    }
  }
  alignas(64) float m[16];
  for (int a = 0; a < kA; ++a) V::store(m + a * V::kW, lo[a]);
  for (; c < k; ++c) {
    const float x = (db + t[c]) + 2.0f * s[c];
    if (x < m[c & 15]) m[c & 15] = x;
  }
  // kth_of_16 with the 16 counts in vectors: each minimum kept where kk lie at or below it
  typename V::T n[kA];
  const typename V::T one = V::set1(1.0f), zero = V::set1(0.0f), need = V::set1(float(kk));
  for (int a = 0; a < kA; ++a) {
    lo[a] = V::load(m + a * V::kW);
    n[a] = zero;
  }
  for (int j = 0; j < 16; ++j) {
    const typename V::T mj = V::set1(m[j]);
    for (int a = 0; a < kA; ++a) n[a] = V::add(n[a], V::blend(V::le(mj, lo[a]), zero, one));
  }
  for (int a = 0; a < kA; ++a)
    V::store(m + a * V::kW, V::blend(V::le(need, n[a]), V::set1(__builtin_inff()), lo[a]));
  return *std::min_element(m, m + 16);
}

template <class V>
inline void row_add_simd(const float* a, const float* b, int64_t k, float* out) {
  int64_t c = 0;
  for (; c + V::kW <= k; c += V::kW) V::store(out + c, V::add(V::load(a + c), V::load(b + c)));
  for (; c < k; ++c) out[c] = a[c] + b[c];
}

// The table of one vector ISA V: every entry the templates of this file instantiated for V
// (avx2.cpp and avx512.cpp differ only in V).
template <class V>
constexpr Kernels simd_kernels() {
  return {assign_simd<V>, topk_simd<V>, table_simd<V>, scan_simd<V, uint8_t>,
          scan_simd<V, uint16_t>, dots_simd<V>, lut_argmin_simd<V>, beam_offer_simd<V>,
          row_add_simd<V>, beam_bound_simd<V>};
}

}  // namespace vq
}  // namespace qk
