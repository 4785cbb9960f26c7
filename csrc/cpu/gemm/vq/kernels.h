// Internal interface of the VQ matmul (api.h): the per-ISA inner loops over one block of 16
// rows and the templates the SIMD files instantiate.
#pragma once
#include <cstdint>

#include "cpu/gemm/vq/api.h"
#include "cpu/runtime/isa.h"

namespace qk {
namespace vqmm {

// Indices are clamped to kc - 1 (or wrap inside a register table) before any look-up.
// 4-bit codes packed 8 to a 32-bit word (api.h gemm_vq_p4: word w of lane l holds the codes of
// vectors 8 w .. 8 w + 7, LSB first).
struct Nib4 {
  uint32_t word;
};

// Code (v, l) of a block's codes (v counted from where `codes` points: a multiple of 8 for
// Nib4).
inline uint32_t code_of(const uint8_t* codes, int64_t v, int64_t l) {
  return codes[v * kVqRows + l];
}
inline uint32_t code_of(const uint16_t* codes, int64_t v, int64_t l) {
  return codes[v * kVqRows + l];
}
inline uint32_t code_of(const Nib4* codes, int64_t v, int64_t l) {
  return (codes[(v >> 3) * kVqRows + l].word >> (4 * (v & 7))) & 15u;
}

// The loops over one block's codes, per code type (uint8_t, uint16_t). Every entry returns the
// largest code it read (the caller checks it against kc).
template <class Code>
struct CodeKernels {
  // chains[(v0 + v) % 4][l] += lut[v][codes[v][l]] for v < nvt in order (codes (nvt, 16);
  // chains [4][16]: api.h's four partial sums of the table and lanes paths)
  uint32_t (*acc)(const float* lut, int64_t kc, int64_t nvt, const Code* codes, int64_t v0,
                  float* chains);
  // the same with t = sum_d books[base[l] + code dim + d] * x[v dim + d] (the lanes path)
  uint32_t (*lane)(const float* x, int64_t nvt, int64_t dim, const Code* codes, int64_t kc,
                   const float* books, const int32_t* base, int64_t v0, float* chains);
  // build then acc for one block whose table row fits a register (kc <= Kernels::fused_kc):
  // the same bits, without storing the table (a block with a codebook of its own)
  uint32_t (*fused)(const float* x, int64_t nvt, int64_t dim, const float* bookt, int64_t kc,
                    const Code* codes, int64_t v0, float* chains);
  // the rows path (api.h): part[l] = the tree-reduced 32 partial sums of one segment of len
  // columns (len % 32 == 0, dim 2, 4 or 8) of row l, its codebook at books + off[l]; nothing
  // is computed when a code is out of range.
  uint32_t (*rows)(const float* x, int64_t len, int64_t dim, const Code* codes, int64_t kc,
                   const float* books, const int64_t* off, float* part);
};

struct Kernels {
  // lut (nvt, kc): lut[v][c] = sum_d x[v dim + d] * bookt[d][c] (bookt (dim, kc), api.h order)
  void (*build)(const float* x, int64_t nvt, int64_t dim, const float* bookt, int64_t kc,
                float* lut);
  int64_t fused_kc;  // the largest kc of `fused` (0: none)
  CodeKernels<uint8_t> u8;
  CodeKernels<uint16_t> u16;
  CodeKernels<Nib4> u4;  // the table path only (lane and rows null)
  template <class Code>
  const CodeKernels<Code>& of() const {
    if constexpr (sizeof(Code) == 1)
      return u8;
    else if constexpr (sizeof(Code) == 2)
      return u16;
    else
      return u4;
  }
};

// The largest of n codes (in the codes' own type: a loop the compiler vectorizes).
template <class Code>
inline uint32_t max_code(const Code* codes, int64_t n) {
  Code top = 0;
  for (int64_t i = 0; i < n; ++i) top = codes[i] > top ? codes[i] : top;
  return top;
}

extern const Kernels kScalarKernels;  // scalar.cpp
const Kernels* avx2_kernels();        // avx2.cpp
const Kernels* avx512_kernels();      // avx512.cpp

inline const Kernels& kernels() {
  const Kernels* const by_isa[] = {&kScalarKernels, avx2_kernels(), avx512_kernels()};
  return pick(by_isa);
}

// The SIMD loops, V a float vector of V::kW lanes (16 / V::kW vectors per block) with
// load_n / store_n (the first n lanes), codes(p) (V::kW codes at p as int32 lanes), nibbles(p,
// s) (V::kW words at p shifted right by s, masked to 4 bits), clamp, umax, lookup(row, kc, idx)
// (row[idx] for kc <= V::kPerm entries, a permutation) and gather(base, idx) (base[idx]).
template <class V>
typename V::I codes_at(const uint8_t* codes, int64_t v, int u) {
  return V::codes(codes + v * kVqRows + u * V::kW);
}
template <class V>
typename V::I codes_at(const uint16_t* codes, int64_t v, int u) {
  return V::codes(codes + v * kVqRows + u * V::kW);
}
template <class V>
typename V::I codes_at(const Nib4* codes, int64_t v, int u) {
  return V::nibbles(&codes[(v >> 3) * kVqRows + u * V::kW].word, static_cast<int>(4 * (v & 7)));
}
template <class V>
void build_simd(const float* x, int64_t nvt, int64_t dim, const float* bookt, int64_t kc,
                float* lut) {
  for (int64_t v = 0; v < nvt; ++v, lut += kc) {
    const float* xv = x + v * dim;
    for (int64_t c = 0; c < kc; c += V::kW) {
      const int64_t w = kc - c < V::kW ? kc - c : V::kW;
      typename V::T t = V::mul(V::set1(xv[0]), V::load_n(bookt + c, w));
      for (int64_t d = 1; d < dim; ++d)
        t = V::add(t, V::mul(V::set1(xv[d]), V::load_n(bookt + d * kc + c, w)));
      V::store_n(lut + c, t, w);
    }
  }
}

// Adds term(v, t) (t: the V::kT vectors of the 16 lanes for vector v) for v < nvt to the four
// chains of `chains` ([4][16] floats): vector v goes to chain (v0 + v) % 4, in order.
template <class V, class Term>
inline void chain_loop(int64_t nvt, int64_t v0, float* chains, Term term) {
  constexpr int kVec = static_cast<int>(kVqRows / V::kW);
  typename V::T r[4][kVec], t[kVec];
  for (int k = 0; k < 4; ++k)
    for (int u = 0; u < kVec; ++u) r[k][u] = V::load(chains + ((v0 + k) & 3) * kVqRows + u * V::kW);
  int64_t v = 0;
  for (; v + 4 <= nvt; v += 4)
    for (int k = 0; k < 4; ++k) {
      term(v + k, t);
      for (int u = 0; u < kVec; ++u) r[k][u] = V::add(r[k][u], t[u]);
    }
  for (int k = 0; k < 3; ++k)
    if (v + k < nvt) {
      term(v + k, t);
      for (int u = 0; u < kVec; ++u) r[k][u] = V::add(r[k][u], t[u]);
    }
  for (int k = 0; k < 4; ++k)
    for (int u = 0; u < kVec; ++u) V::store(chains + ((v0 + k) & 3) * kVqRows + u * V::kW, r[k][u]);
}

template <class V, bool kPerm, class Code>
uint32_t acc_loop(const float* lut, int64_t kc, int64_t nvt, const Code* codes, int64_t v0,
                  float* chains) {
  constexpr int kVec = static_cast<int>(kVqRows / V::kW);
  typename V::I top = V::zeroi();
  const typename V::I last = V::set1i(static_cast<int32_t>(kc - 1));
  chain_loop<V>(nvt, v0, chains, [&](int64_t v, typename V::T* t) {
    for (int u = 0; u < kVec; ++u) {
      typename V::I ix = codes_at<V>(codes, v, u);
      top = V::umax(top, ix);
      if constexpr (kPerm) {
        t[u] = V::lookup(lut + v * kc, kc, ix);
      } else {
        ix = V::clamp(ix, last);
        t[u] = V::gather(lut + v * kc, ix);
      }
    }
  });
  return V::hmax(top);
}

template <class V, class Code>
uint32_t acc_simd(const float* lut, int64_t kc, int64_t nvt, const Code* codes, int64_t v0,
                  float* chains) {
  return kc <= V::kPerm ? acc_loop<V, true>(lut, kc, nvt, codes, v0, chains)
                        : acc_loop<V, false>(lut, kc, nvt, codes, v0, chains);
}

template <class V, class Code>
uint32_t lane_simd(const float* x, int64_t nvt, int64_t dim, const Code* codes, int64_t kc,
                   const float* books, const int32_t* base, int64_t v0, float* chains) {
  constexpr int kVec = static_cast<int>(kVqRows / V::kW);
  typename V::I top = V::zeroi();
  const typename V::I last = V::set1i(static_cast<int32_t>(kc - 1));
  typename V::I b[kVec];
  for (int u = 0; u < kVec; ++u) b[u] = V::loadi(base + u * V::kW);
  chain_loop<V>(nvt, v0, chains, [&](int64_t v, typename V::T* t) {
    const float* xv = x + v * dim;
    for (int u = 0; u < kVec; ++u) {
      const typename V::I ix = codes_at<V>(codes, v, u);
      top = V::umax(top, ix);
      const typename V::I at = V::addi(b[u], V::mulsmall(V::clamp(ix, last), dim));
      t[u] = V::mul(V::gather(books, at), V::set1(xv[0]));
      for (int64_t d = 1; d < dim; ++d)
        t[u] = V::add(t[u], V::mul(V::gather(books + d, at), V::set1(xv[d])));
    }
  });
  return V::hmax(top);
}

// build_simd's row t (kc <= V::kW entries) kept in a register and looked up at once; kDim
// the vector length (a template argument: the row's sums unrolled, no branches per vector).
template <class V, int kDim, class Code>
uint32_t fused_dim(const float* x, int64_t nvt, const float* bookt, int64_t kc,
                   const Code* codes, int64_t v0, float* chains) {
  constexpr int kVec = static_cast<int>(kVqRows / V::kW);
  typename V::T col[kDim];
  for (int d = 0; d < kDim; ++d) col[d] = V::load_n(bookt + d * kc, kc);
  typename V::I top = V::zeroi();
  chain_loop<V>(nvt, v0, chains, [&](int64_t v, typename V::T* t) {
    const float* xv = x + v * kDim;
    typename V::T row = V::mul(V::set1(xv[0]), col[0]);
    for (int d = 1; d < kDim; ++d) row = V::add(row, V::mul(V::set1(xv[d]), col[d]));
    for (int u = 0; u < kVec; ++u) {
      const typename V::I ix = codes_at<V>(codes, v, u);
      top = V::umax(top, ix);
      t[u] = V::permute(row, ix);
    }
  });
  return V::hmax(top);
}

// dim 1, 2, 4 or 8 (the caller's rule)
template <class V, class Code>
uint32_t fused_simd(const float* x, int64_t nvt, int64_t dim, const float* bookt, int64_t kc,
                    const Code* codes, int64_t v0, float* chains) {
  switch (dim) {
    case 1: return fused_dim<V, 1>(x, nvt, bookt, kc, codes, v0, chains);
    case 2: return fused_dim<V, 2>(x, nvt, bookt, kc, codes, v0, chains);
    case 4: return fused_dim<V, 4>(x, nvt, bookt, kc, codes, v0, chains);
    default: return fused_dim<V, 8>(x, nvt, bookt, kc, codes, v0, chains);
  }
}

// The rows path: 32 / V::kW vector accumulators (lane j of accumulator u: the partial sum of
// the columns = u kW + j mod 32), each step kW weights decoded from kW / dim entries.
template <class V, int kDim, class Code>
void rows_dim(const float* x, int64_t len, const Code* codes, const float* books,
              const int64_t* off, float* part) {
  constexpr int kA = static_cast<int>(32 / V::kW);
  for (int64_t l = 0; l < kVqRows; ++l) {
    const float* bk = books + off[l];
    const Code* cl = codes + l;
    typename V::T a[kA];
    for (int u = 0; u < kA; ++u) a[u] = V::set1(0.0f);
    const float* xe = x;
    for (int64_t e0 = 0; e0 < len; e0 += 32, xe += 32, cl += 32 / kDim * kVqRows)
      for (int u = 0; u < kA; ++u) {
        const typename V::T w =
            V::template weights<kDim>(bk, cl + u * V::kW / kDim * kVqRows);
        a[u] = V::add(a[u], V::mul(w, V::load(xe + u * V::kW)));
      }
    part[l] = V::reduce32(a);
  }
}

template <class V, class Code>
uint32_t rows_simd(const float* x, int64_t len, int64_t dim, const Code* codes, int64_t kc,
                   const float* books, const int64_t* off, float* part) {
  const uint32_t top = max_code(codes, len / dim * kVqRows);
  if (top >= static_cast<uint64_t>(kc)) return top;
  if (dim == 2) rows_dim<V, 2>(x, len, codes, books, off, part);
  if (dim == 4) rows_dim<V, 4>(x, len, codes, books, off, part);
  if (dim == 8) rows_dim<V, 8>(x, len, codes, books, off, part);
  return top;
}

template <class V, class Code>
constexpr CodeKernels<Code> code_kernels() {
  return {acc_simd<V, Code>, lane_simd<V, Code>, fused_simd<V, Code>, rows_simd<V, Code>};
}

template <class V>
constexpr Kernels simd_kernels() {
  return {build_simd<V>, V::kW, code_kernels<V, uint8_t>(), code_kernels<V, uint16_t>(),
          {acc_simd<V, Nib4>, nullptr, fused_simd<V, Nib4>, nullptr}};
}

}  // namespace vqmm
}  // namespace qk
