// Bodies of the CUDA matmul kernels (gemm.cuh), written so that the host can run them too.
//
// A kernel here is a struct with a Ctx (its arguments, trivially copyable), a per-thread
// State (registers) and `step(ctx, block, tid, s, state, smem)`: the work of one thread
// between two barriers. The device driver (gemm.cu) runs steps 0 .. num_steps-1 with
// __syncthreads() after each; steps for which is_reduce() holds are warp all-reductions of
// State::red by __shfl_xor_sync butterflies (offsets 16 .. kRedMinOff) with combine().
// The host emulator runs the same steps thread by thread (forward or reverse thread order,
// so a read of shared data written in the same step shows up as a difference), does the
// butterflies lane by lane in the same order, and checks every global and shared access
// against its buffer (QK_EMU_CHECK; compiled out on the device). The numeric rules are the
// QK_HD functions of core/matmul.h, so the CPU tests of the emulation cover the device math
// except the intrinsics (__dp4a, __shfl_xor_sync, __ldg) and the launch itself.
//
// All blocks have kThreads = 256 threads; all grids are 1-D.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/matmul.h"

namespace qk {
namespace cuda {
namespace gemm {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGemvMaxM = 8;  // rows of x per GEMV launch (more rows: GEMM, or row chunks)

#if defined(__CUDA_ARCH__)
#define QK_EMU_CHECK(cond) ((void)0)
#else
[[noreturn]] void emu_fail(const char* what, int line);  // gemm.cu: throws
#define QK_EMU_CHECK(cond) ((cond) ? (void)0 : ::qk::cuda::gemm::emu_fail(#cond, __LINE__))
#endif

// ---- checked memory access ---------------------------------------------------------------------

// Element i of a read-only global array of n elements.
template <class T>
QK_HD T ld(const T* p, int64_t i, int64_t n) {
  QK_EMU_CHECK(p != nullptr && i >= 0 && i < n);
#if defined(__CUDA_ARCH__)
  return __ldg(p + i);
#else
  return p[i];
#endif
}

// A vector V (uint4, float4, uint32_t) at byte offset `off` of a read-only global buffer of
// `nbytes` bytes; the address must be a multiple of sizeof(V).
template <class V>
QK_HD V ldv(const void* base, int64_t off, int64_t nbytes) {
  const char* p = static_cast<const char*>(base) + off;
  QK_EMU_CHECK(base != nullptr && off >= 0 && off + static_cast<int64_t>(sizeof(V)) <= nbytes);
  QK_EMU_CHECK(reinterpret_cast<uintptr_t>(p) % sizeof(V) == 0);
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const V*>(p));
#else
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
#endif
}

template <class T>
QK_HD void st(T* p, int64_t i, int64_t n, T v) {
  QK_EMU_CHECK(p != nullptr && i >= 0 && i < n);
  p[i] = v;
}

template <class V>
QK_HD void stv(void* base, int64_t off, int64_t nbytes, const V& v) {
  char* p = static_cast<char*>(base) + off;
  QK_EMU_CHECK(base != nullptr && off >= 0 && off + static_cast<int64_t>(sizeof(V)) <= nbytes);
  QK_EMU_CHECK(reinterpret_cast<uintptr_t>(p) % sizeof(V) == 0);
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<V*>(p) = v;
#else
  std::memcpy(p, &v, sizeof(V));
#endif
}

// A region of shared memory: n elements of T.
template <class T>
struct Sm {
  T* p;
  int n;
  QK_HD T& operator[](int i) const {
    QK_EMU_CHECK(i >= 0 && i < n);
    return p[i];
  }
  // Vector V at element i (i a multiple of the vector width).
  template <class V>
  QK_HD V vec(int i) const {
    QK_EMU_CHECK(i >= 0 && i + static_cast<int>(sizeof(V) / sizeof(T)) <= n &&
                 i % static_cast<int>(sizeof(V) / sizeof(T)) == 0);
#if defined(__CUDA_ARCH__)
    return *reinterpret_cast<const V*>(p + i);
#else
    V v;
    std::memcpy(&v, p + i, sizeof(V));
    return v;
#endif
  }
};

// Carves 16-byte aligned regions off the dynamic shared memory, in order.
struct Carver {
  unsigned char* p;
  template <class T>
  QK_HD Sm<T> take(int n) {
    Sm<T> r{reinterpret_cast<T*>(p), n};
    p += (static_cast<size_t>(n) * sizeof(T) + 15) / 16 * 16;
    return r;
  }
};
template <class T>
constexpr size_t region_bytes(int n) {
  return (static_cast<size_t>(n) * sizeof(T) + 15) / 16 * 16;
}

// Component r (0..3) of a 4-vector; r is a constant after unrolling.
template <class V>
QK_HD auto comp(const V& v, int r) -> decltype(v.x) {
  return r == 0 ? v.x : r == 1 ? v.y : r == 2 ? v.z : v.w;
}

// For kernels without warp reductions.
struct NoReduce {
  static constexpr int kRed = 1;
  static constexpr int kRedMinOff = 32;
  using Red = float;
  QK_HD static Red combine(Red a, Red) { return a; }
  template <class Ctx>
  QK_HD static bool is_reduce(const Ctx&, int) { return false; }
};

// ================================================================================================
// int4 group-wise (qkern::gemm_w4), docs/numerics.md "int4 group-wise matmul". Every output is
// computed in the order of the definition (exact mode: an FMA chain per group in k order, then
// an FMA chain over the groups; fast mode: an FMA chain over the blocks of a group of the exact
// integer block dot products, then over the groups), so GEMV and GEMM give the CPU's bits.
// ================================================================================================

struct W4Ctx {
  const float* x;          // (m, k)
  const uint8_t* packed;   // tile layout, ntiles * 8 * k / 2 bytes
  const float* scales;     // (ntiles, ng, 8)
  const int32_t* zeros;    // like scales, or null
  const float* bias;       // (n) or null
  float* y;                // (m, n)
  const int8_t* xq;        // fast mode: (m, k) activation codes
  const float* dx;         // fast mode: (m, nb) block scales
  const float* xs;         // fast mode: (m, nb) block code sums (exact integers as float)
  int* bad;                // fast mode: set to 1 when x holds NaN or Inf
  int64_t m, n, k, group;
  int64_t nb, ng, bpg, ntiles;  // blocks of 32, groups, blocks per group, tiles of 8 rows
  int gc, rows_pb, nchunks;     // GEMV: groups per chunk, rows per CUDA block, chunks
  int64_t nbm;                  // GEMM: blocks of 64 rows of x

  QK_HD int64_t x_bytes() const { return m * k * 4; }
  QK_HD int64_t packed_bytes() const { return ntiles * 8 * k / 2; }
  QK_HD int64_t params() const { return ntiles * 8 * ng; }
  QK_HD int64_t param_index(int64_t tile, int64_t g, int r) const {
    return (tile * ng + g) * 8 + r;
  }
  QK_HD int64_t word_offset(int64_t tile, int64_t b, int i, int r) const {
    return (tile * nb + b) * 128 + 32 * i + 4 * r;
  }
  QK_HD float code_offset(int64_t tile, int64_t g, int r) const {
    return mm::w4_code_offset(zeros ? ld(zeros, param_index(tile, g, r), params()) : 0);
  }
};

// Fast-mode activation quantization: one thread per (row, block of 32).
struct W4QuantX : NoReduce {
  using Ctx = W4Ctx;
  struct State {
    Red red[kRed];
  };
  static size_t smem_bytes(const Ctx&) { return 0; }
  static int64_t blocks(const Ctx& c) { return (c.m * c.nb + kThreads - 1) / kThreads; }
  QK_HD static int num_steps(const Ctx&) { return 1; }
  QK_HD static void step(const Ctx& c, int64_t block, int tid, int, State&, unsigned char*) {
    const int64_t item = block * kThreads + tid;
    if (item >= c.m * c.nb) return;
    const int64_t row = item / c.nb, b = item % c.nb, base = row * c.k + b * 32;
    float v[32];
    for (int q = 0; q < 8; ++q) {
      const float4 f = ldv<float4>(c.x, (base + 4 * q) * 4, c.x_bytes());
      v[4 * q] = f.x;
      v[4 * q + 1] = f.y;
      v[4 * q + 2] = f.z;
      v[4 * q + 3] = f.w;
    }
    float amax = 0.0f;
    bool bad = false;
    for (int j = 0; j < 32; ++j) amax = mm::w4_amax_step(amax, v[j], &bad);
    const float d = mm::w4_block_scale(amax, bad);
    uint32_t words[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int32_t sum = 0;
    if (mm::w4_block_live(d)) {
      const float r = 1.0f / d;
      for (int j = 0; j < 32; ++j) {
        const int32_t q = mm::w4_act_code(v[j], r);
        sum += q;
        words[j / 4] |= (static_cast<uint32_t>(q) & 0xFFu) << (8 * (j % 4));
      }
    }
    int8_t* xq = const_cast<int8_t*>(c.xq);
    stv(xq, base, c.m * c.k, make_uint4(words[0], words[1], words[2], words[3]));
    stv(xq, base + 16, c.m * c.k, make_uint4(words[4], words[5], words[6], words[7]));
    if (bad) st(c.bad, 0, 1, 1);
    st(const_cast<float*>(c.dx), item, c.m * c.nb, d);
    st(const_cast<float*>(c.xs), item, c.m * c.nb, static_cast<float>(sum));
  }
};

// GEMV (m <= MMAX): a thread computes, for 4 rows (half a tile) and one group, the group sums
// of every row of x; a chunk of gc groups x rows_pb rows goes through shared memory, where one
// thread per (row of x, weight row) continues the FMA chain over the groups in order.
// Shared: A[m][gcl][row] (MMAX * 1024 floats), S[gcl][row] (1024 floats): gc * rows_pb = 1024.
template <int MMAX, bool FAST>
struct W4Gemv : NoReduce {
  using Ctx = W4Ctx;
  struct State {
    Red red[kRed];
    float y[MMAX];
  };
  static size_t smem_bytes(const Ctx&) { return region_bytes<float>((MMAX + 1) * 1024); }
  static int64_t blocks(const Ctx& c) {
    const int64_t tiles_pb = c.rows_pb / 8;
    return (c.ntiles + tiles_pb - 1) / tiles_pb;
  }
  QK_HD static int num_steps(const Ctx& c) { return 2 * c.nchunks + 1; }

  QK_HD static void group_sums(const Ctx& c, int64_t tile, int half, int64_t g,
                               float (&a)[MMAX][4]) {
    float zc[4];
    for (int rr = 0; rr < 4; ++rr) zc[rr] = c.code_offset(tile, g, 4 * half + rr);
    for (int64_t b = g * c.bpg; b < (g + 1) * c.bpg; ++b) {
      uint4 w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        w[i] = ldv<uint4>(c.packed, c.word_offset(tile, b, i, 4 * half), c.packed_bytes());
      if constexpr (!FAST) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float wv[8][4];
#pragma unroll
          for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int rr = 0; rr < 4; ++rr)
              wv[j][rr] = mm::w4_weight(mm::w4_nibble(comp(w[i], rr), j), zc[rr]);
#pragma unroll
          for (int mi = 0; mi < MMAX; ++mi) {
            if (mi >= c.m) break;
            const int64_t xo = (mi * c.k + b * 32 + 8 * i) * 4;
            const float4 x0 = ldv<float4>(c.x, xo, c.x_bytes());
            const float4 x1 = ldv<float4>(c.x, xo + 16, c.x_bytes());
            const float xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
              for (int rr = 0; rr < 4; ++rr) a[mi][rr] = fmaf(xv[j], wv[j][rr], a[mi][rr]);
          }
        }
      } else {
#pragma unroll
        for (int mi = 0; mi < MMAX; ++mi) {
          if (mi >= c.m) break;
          const int64_t xo = mi * c.k + b * 32;
          const uint4 q0 = ldv<uint4>(c.xq, xo, c.m * c.k);
          const uint4 q1 = ldv<uint4>(c.xq, xo + 16, c.m * c.k);
          const uint32_t xw[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
          const float d = ld(c.dx, mi * c.nb + b, c.m * c.nb);
          const float xs = ld(c.xs, mi * c.nb + b, c.m * c.nb);
#pragma unroll
          for (int rr = 0; rr < 4; ++rr) {
            int32_t du = 0;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              du = mm::dot4_s8(mm::w4_low_nibbles(comp(w[i], rr)), xw[2 * i], du);
              du = mm::dot4_s8(mm::w4_high_nibbles(comp(w[i], rr)), xw[2 * i + 1], du);
            }
            a[mi][rr] = fmaf(d, mm::w4_block_dot(du, zc[rr], xs), a[mi][rr]);
          }
        }
      }
    }
  }

  QK_HD static void step(const Ctx& c, int64_t block, int tid, int s, State& state,
                         unsigned char* smem) {
    Carver cv{smem};
    const Sm<float> A = cv.take<float>(MMAX * 1024), S = cv.take<float>(1024);
    const int ht = c.rows_pb / 4;  // half tiles per block; ht * gc == kThreads
    const int64_t chunk = s / 2;
    if (s == 2 * c.nchunks) {  // write y (+ bias)
      for (int e = 0; e < MMAX; ++e) {
        const int item = tid + kThreads * e, mi = item / c.rows_pb, row = item % c.rows_pb;
        const int64_t n = block * c.rows_pb + row;
        if (mi < c.m && n < c.n)
          st(c.y, mi * c.n + n, c.m * c.n, mm::add_bias(state.y[e], c.bias, n));
      }
    } else if (s % 2 == 0) {  // group sums of a chunk
      const int lh = tid % ht, gcl = tid / ht;
      const int64_t g = chunk * c.gc + gcl, tile = block * (ht / 2) + lh / 2;
      const int half = lh % 2;
      float a[MMAX][4];
      float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int mi = 0; mi < MMAX; ++mi)
        for (int rr = 0; rr < 4; ++rr) a[mi][rr] = 0.0f;
      if (g < c.ng && tile < c.ntiles) {
        const float4 s4 = ldv<float4>(c.scales, c.param_index(tile, g, 4 * half) * 4,
                                      c.params() * 4);
        sc[0] = s4.x;
        sc[1] = s4.y;
        sc[2] = s4.z;
        sc[3] = s4.w;
        group_sums(c, tile, half, g, a);
      }
      for (int rr = 0; rr < 4; ++rr) {
        S[gcl * c.rows_pb + 4 * lh + rr] = sc[rr];
        for (int mi = 0; mi < MMAX; ++mi)
          A[(mi * c.gc + gcl) * c.rows_pb + 4 * lh + rr] = a[mi][rr];
      }
    } else {  // continue the chain over this chunk's groups
      const int64_t left = c.ng - chunk * c.gc;
      const int ngc = left < c.gc ? static_cast<int>(left) : c.gc;
      for (int e = 0; e < MMAX; ++e) {
        const int item = tid + kThreads * e, mi = item / c.rows_pb, row = item % c.rows_pb;
        if (mi >= c.m) continue;
        float y = state.y[e];
        for (int gcl = 0; gcl < ngc; ++gcl)
          y = fmaf(S[gcl * c.rows_pb + row], A[(mi * c.gc + gcl) * c.rows_pb + row], y);
        state.y[e] = y;
      }
    }
  }
};

// GEMM: 64 rows of x x 64 weight rows (8 tiles) per block, a 4 x 4 micro-tile per thread,
// one block of 32 along K per pair of steps (stage, then multiply-accumulate).
// Exact: Xs[kk][row], Ws[kk][col] floats (32 x 64 each). Fast: Xq[w][row], Wq[w][col] int8x4
// words (8 x 64 each), Dx[row], Xsum[row], Zc[col].
template <bool FAST>
struct W4Gemm : NoReduce {
  using Ctx = W4Ctx;
  struct State {
    Red red[kRed];
    float a[4][4];
    float y[4][4];
  };
  static size_t smem_bytes(const Ctx&) {
    return FAST ? 2 * region_bytes<uint32_t>(512) + 3 * region_bytes<float>(64)
                : 2 * region_bytes<float>(2048);
  }
  static int64_t blocks(const Ctx& c) { return c.nbm * ((c.ntiles + 7) / 8); }
  QK_HD static int num_steps(const Ctx& c) { return static_cast<int>(2 * c.nb + 1); }

  QK_HD static void step(const Ctx& c, int64_t block, int tid, int s, State& state,
                         unsigned char* smem) {
    const int64_t m0 = (block % c.nbm) * 64, t0 = (block / c.nbm) * 8;
    const int ty = tid / 16, tx = tid % 16;
    Carver cv{smem};
    if (s == 2 * c.nb) {
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          const int64_t mi = m0 + ty * 4 + i, n = t0 * 8 + tx * 4 + j;
          if (mi < c.m && n < c.n)
            st(c.y, mi * c.n + n, c.m * c.n, mm::add_bias(state.y[i][j], c.bias, n));
        }
      return;
    }
    const int64_t b = s / 2, g = b / c.bpg;
    if constexpr (!FAST) {
      const Sm<float> Xs = cv.take<float>(2048), Ws = cv.take<float>(2048);
      if (s % 2 == 0) {
        for (int e = 0; e < 2; ++e) {
          const int idx = tid + kThreads * e, row = idx % 64, q = idx / 64;
          const int64_t mi = m0 + row;
          float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          if (mi < c.m) v = ldv<float4>(c.x, (mi * c.k + b * 32 + 4 * q) * 4, c.x_bytes());
          for (int t = 0; t < 4; ++t) Xs[(4 * q + t) * 64 + row] = comp(v, t);
        }
        const int tt = tid / 32, i = (tid / 8) % 4, r = tid % 8, col = tt * 8 + r;
        const int64_t tile = t0 + tt;
        if (tile < c.ntiles) {
          const uint32_t w =
              ldv<uint32_t>(c.packed, c.word_offset(tile, b, i, r), c.packed_bytes());
          const float zc = c.code_offset(tile, g, r);
          for (int j = 0; j < 8; ++j)
            Ws[(8 * i + j) * 64 + col] = mm::w4_weight(mm::w4_nibble(w, j), zc);
        } else {
          for (int j = 0; j < 8; ++j) Ws[(8 * i + j) * 64 + col] = 0.0f;
        }
        return;
      }
#pragma unroll 4
      for (int kk = 0; kk < 32; ++kk) {
        const float4 xa = Xs.vec<float4>(kk * 64 + ty * 4), wa = Ws.vec<float4>(kk * 64 + tx * 4);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            state.a[i][j] = fmaf(comp(xa, i), comp(wa, j), state.a[i][j]);
      }
    } else {
      const Sm<uint32_t> Xq = cv.take<uint32_t>(512), Wq = cv.take<uint32_t>(512);
      const Sm<float> Dx = cv.take<float>(64), Xsum = cv.take<float>(64), Zc = cv.take<float>(64);
      if (s % 2 == 0) {
        for (int e = 0; e < 2; ++e) {
          const int idx = tid + kThreads * e, row = idx % 64, w = idx / 64;
          const int64_t mi = m0 + row;
          Xq[w * 64 + row] =
              mi < c.m ? ldv<uint32_t>(c.xq, mi * c.k + b * 32 + 4 * w, c.m * c.k) : 0u;
        }
        if (tid < 64) {
          const int64_t mi = m0 + tid;
          Dx[tid] = mi < c.m ? ld(c.dx, mi * c.nb + b, c.m * c.nb) : 0.0f;
          Xsum[tid] = mi < c.m ? ld(c.xs, mi * c.nb + b, c.m * c.nb) : 0.0f;
        } else if (tid < 128) {
          const int col = tid - 64;
          const int64_t tile = t0 + col / 8;
          Zc[col] = tile < c.ntiles ? c.code_offset(tile, g, col % 8) : 8.0f;
        }
        const int tt = tid / 32, i = (tid / 8) % 4, r = tid % 8, col = tt * 8 + r;
        const int64_t tile = t0 + tt;
        const uint32_t w = tile < c.ntiles ? ldv<uint32_t>(c.packed, c.word_offset(tile, b, i, r),
                                                           c.packed_bytes())
                                           : 0x88888888u;
        Wq[(2 * i) * 64 + col] = mm::w4_low_nibbles(w);
        Wq[(2 * i + 1) * 64 + col] = mm::w4_high_nibbles(w);
        return;
      }
      int32_t du[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) du[i][j] = 0;
#pragma unroll
      for (int w = 0; w < 8; ++w) {
        const uint4 xw = Xq.vec<uint4>(w * 64 + ty * 4), ww = Wq.vec<uint4>(w * 64 + tx * 4);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) du[i][j] = mm::dot4_s8(comp(ww, j), comp(xw, i), du[i][j]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          state.a[i][j] = fmaf(Dx[ty * 4 + i],
                               mm::w4_block_dot(du[i][j], Zc[tx * 4 + j], Xsum[ty * 4 + i]),
                               state.a[i][j]);
    }
    if ((b + 1) % c.bpg == 0) {  // end of a group: y = fma(s, a, y), a = 0
      const int64_t tile = t0 + tx / 2;
      float4 s4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (tile < c.ntiles)
        s4 = ldv<float4>(c.scales, c.param_index(tile, g, 4 * (tx % 2)) * 4, c.params() * 4);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          state.y[i][j] = fmaf(comp(s4, j), state.a[i][j], state.y[i][j]);
          state.a[i][j] = 0.0f;
        }
    }
  }
};

// ================================================================================================
// 4-bit lookup table (qkern::gemm_lut4): w = table[c] * s, float32 FMA accumulation.
// ================================================================================================

struct Lut4Ctx {
  const float* x;          // (m, k)
  const uint8_t* packed;   // (n, k / 2) nibble streams
  const float* scales;     // (n, ng)
  const float* table;      // 16 values
  const float* bias;       // (n) or null
  float* y;                // (m, n)
  int64_t m, n, k, group, ng;
  int64_t nbm;             // GEMM: blocks of 64 rows of x
  QK_HD int64_t x_bytes() const { return m * k * 4; }
  QK_HD int64_t packed_bytes() const { return n * (k / 2); }
};

// GEMV: one warp per weight row; lane l takes the chunks of 32 codes l, l + 32, ... (one
// 16-byte load each), then a butterfly sums the lanes. Shared: the table.
template <int MMAX>
struct Lut4Gemv {
  using Ctx = Lut4Ctx;
  static constexpr int kRed = MMAX;
  static constexpr int kRedMinOff = 1;
  using Red = float;
  QK_HD static Red combine(Red a, Red b) { return a + b; }
  QK_HD static bool is_reduce(const Ctx&, int s) { return s == 2; }
  struct State {
    Red red[kRed];
  };
  static size_t smem_bytes(const Ctx&) { return region_bytes<float>(16); }
  static int64_t blocks(const Ctx& c) { return (c.n + kWarps - 1) / kWarps; }
  QK_HD static int num_steps(const Ctx&) { return 4; }

  QK_HD static void step(const Ctx& c, int64_t block, int tid, int s, State& state,
                         unsigned char* smem) {
    Carver cv{smem};
    const Sm<float> T = cv.take<float>(16);
    const int64_t n = block * kWarps + tid / 32;
    const int lane = tid % 32;
    if (s == 0) {
      if (tid < 16) T[tid] = ld(c.table, tid, 16);
    } else if (s == 1) {
      if (n >= c.n) return;
      for (int64_t ch = lane; ch < c.k / 32; ch += 32) {
        const uint4 v = ldv<uint4>(c.packed, n * (c.k / 2) + 16 * ch, c.packed_bytes());
        const float sc = ld(c.scales, n * c.ng + (32 * ch) / c.group, c.n * c.ng);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float w[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) w[j] = mm::lut4_weight(T.p, mm::lut4_code(comp(v, q), j), sc);
#pragma unroll
          for (int mi = 0; mi < MMAX; ++mi) {
            if (mi >= c.m) break;
            const int64_t xo = (mi * c.k + 32 * ch + 8 * q) * 4;
            const float4 x0 = ldv<float4>(c.x, xo, c.x_bytes());
            const float4 x1 = ldv<float4>(c.x, xo + 16, c.x_bytes());
            const float xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
            for (int j = 0; j < 8; ++j) state.red[mi] = fmaf(xv[j], w[j], state.red[mi]);
          }
        }
      }
    } else if (s == 3) {
      if (lane != 0 || n >= c.n) return;
      for (int mi = 0; mi < MMAX; ++mi)
        if (mi < c.m) st(c.y, mi * c.n + n, c.m * c.n, mm::add_bias(state.red[mi], c.bias, n));
    }
  }
};

// GEMM: 64 x 64 outputs per block, 4 x 4 per thread, an FMA chain in k order per output.
// Shared: the table, Xs[kk][row], Ws[kk][col] (32 x 64 floats each).
struct Lut4Gemm : NoReduce {
  using Ctx = Lut4Ctx;
  struct State {
    Red red[kRed];
    float a[4][4];
  };
  static size_t smem_bytes(const Ctx&) {
    return region_bytes<float>(16) + 2 * region_bytes<float>(2048);
  }
  static int64_t blocks(const Ctx& c) { return c.nbm * ((c.n + 63) / 64); }
  QK_HD static int num_steps(const Ctx& c) { return static_cast<int>(2 * (c.k / 32) + 2); }

  QK_HD static void step(const Ctx& c, int64_t block, int tid, int s, State& state,
                         unsigned char* smem) {
    Carver cv{smem};
    const Sm<float> T = cv.take<float>(16), Xs = cv.take<float>(2048), Ws = cv.take<float>(2048);
    const int64_t m0 = (block % c.nbm) * 64, n0 = (block / c.nbm) * 64;
    const int ty = tid / 16, tx = tid % 16;
    const int last = num_steps(c) - 1;
    if (s == 0) {
      if (tid < 16) T[tid] = ld(c.table, tid, 16);
    } else if (s == last) {
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          const int64_t mi = m0 + ty * 4 + i, n = n0 + tx * 4 + j;
          if (mi < c.m && n < c.n)
            st(c.y, mi * c.n + n, c.m * c.n, mm::add_bias(state.a[i][j], c.bias, n));
        }
    } else if (s % 2 == 1) {  // stage block b = (s - 1) / 2 of 32 codes
      const int64_t b = (s - 1) / 2;
      for (int e = 0; e < 2; ++e) {
        const int idx = tid + kThreads * e, row = idx % 64, q = idx / 64;
        const int64_t mi = m0 + row;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (mi < c.m) v = ldv<float4>(c.x, (mi * c.k + b * 32 + 4 * q) * 4, c.x_bytes());
        for (int t = 0; t < 4; ++t) Xs[(4 * q + t) * 64 + row] = comp(v, t);
      }
      const int row = tid / 4, q = tid % 4;
      const int64_t n = n0 + row;
      if (n < c.n) {
        const uint32_t w =
            ldv<uint32_t>(c.packed, n * (c.k / 2) + 16 * b + 4 * q, c.packed_bytes());
        const float sc = ld(c.scales, n * c.ng + (32 * b) / c.group, c.n * c.ng);
        for (int j = 0; j < 8; ++j)
          Ws[(8 * q + j) * 64 + row] = mm::lut4_weight(T.p, mm::lut4_code(w, j), sc);
      } else {
        for (int j = 0; j < 8; ++j) Ws[(8 * q + j) * 64 + row] = 0.0f;
      }
    } else {
#pragma unroll 4
      for (int kk = 0; kk < 32; ++kk) {
        const float4 xa = Xs.vec<float4>(kk * 64 + ty * 4), wa = Ws.vec<float4>(kk * 64 + tx * 4);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            state.a[i][j] = fmaf(comp(xa, i), comp(wa, j), state.a[i][j]);
      }
    }
  }
};

// ================================================================================================
// int8 weights (qkern::gemm_w8a8, qkern::gemm_w8a16), packed in blocks of 16 output channels
// x 4 consecutive k (csrc/cpu/gemm_w8.h): packed[b * 16 * kp + s * 64 + j * 4 + t].
// ================================================================================================

struct W8Ctx {
  const float* x;          // (m, k) float activations (W8A16; W8A8's quantizer)
  const int8_t* xq;        // W8A8: (m, kp) activation codes, zero padded
  float* sx;               // W8A8: (m) activation scales
  int* bad;                // W8A8: set to 1 when x holds NaN / Inf
  const int8_t* packed;    // np * kp bytes
  const float* w_scale;    // (n)
  const float* bias;       // (n) or null
  float* y;                // (m, n)
  int64_t m, n, k, kp, nblk;  // nblk = np / 16 channel blocks
  int64_t nbm;             // GEMM: blocks of 64 rows of x
  bool x_vec;              // x rows can be read 4 floats at a time (k % 4 == 0, aligned)
  QK_HD int64_t packed_bytes() const { return nblk * 16 * kp; }
  QK_HD int64_t word_offset(int64_t blk, int64_t step, int j) const {
    return blk * 16 * kp + step * 64 + 4 * j;
  }
  // x[row][k0 .. k0 + 3], zero beyond k.
  QK_HD float4 x4(int64_t row, int64_t k0) const {
    if (x_vec && k0 + 4 <= k) return ldv<float4>(x, (row * k + k0) * 4, m * k * 4);
    float v[4];
    for (int t = 0; t < 4; ++t) v[t] = k0 + t < k ? ld(x, row * k + k0 + t, m * k) : 0.0f;
    return make_float4(v[0], v[1], v[2], v[3]);
  }
};

// W8A8 activation quantization: one block per row. Max of |x| over strided elements, a
// butterfly and the 8 warp results (max is exact in any order), then the codes of the row
// (zero padded to kp) and its scale, exactly as quantize_affine_dynamic on the CPU.
struct W8QuantRows {
  using Ctx = W8Ctx;
  static constexpr int kRed = 2;  // amax, bad (0 / 1)
  static constexpr int kRedMinOff = 1;
  using Red = float;
  QK_HD static Red combine(Red a, Red b) { return fmaxf(a, b); }
  QK_HD static bool is_reduce(const Ctx&, int s) { return s == 1; }
  struct State {
    Red red[kRed];
  };
  static size_t smem_bytes(const Ctx&) { return region_bytes<float>(2 * kWarps); }
  static int64_t blocks(const Ctx& c) { return c.m; }
  QK_HD static int num_steps(const Ctx&) { return 4; }

  QK_HD static void step(const Ctx& c, int64_t block, int tid, int s, State& state,
                         unsigned char* smem) {
    Carver cv{smem};
    const Sm<float> P = cv.take<float>(2 * kWarps);
    const int64_t row = block;
    if (s == 0) {
      float amax = 0.0f;
      bool bad = false;
      for (int64_t k = tid; k < c.k; k += kThreads)
        amax = mm::w4_amax_step(amax, ld(c.x, row * c.k + k, c.m * c.k), &bad);
      state.red[0] = amax;
      state.red[1] = bad ? 1.0f : 0.0f;
    } else if (s == 2) {
      if (tid % 32 == 0) {
        P[2 * (tid / 32)] = state.red[0];
        P[2 * (tid / 32) + 1] = state.red[1];
      }
    } else if (s == 3) {
      float amax = P[0], bad = P[1];
      for (int w = 1; w < kWarps; ++w) {
        amax = fmaxf(amax, P[2 * w]);
        bad = fmaxf(bad, P[2 * w + 1]);
      }
      const float scale = mm::w8a8_row_scale(amax);
      int8_t* xq = const_cast<int8_t*>(c.xq);
      for (int64_t k = tid; k < c.kp; k += kThreads) {
        const int32_t q = k < c.k ? mm::w8a8_act_code(ld(c.x, row * c.k + k, c.m * c.k), scale) : 0;
        st(xq, row * c.kp + k, c.m * c.kp, static_cast<int8_t>(q));
      }
      if (tid == 0) {
        st(c.sx, row, c.m, scale);
        if (bad != 0.0f) st(c.bad, 0, 1, 1);
      }
    }
  }
};

// GEMV over one block of 16 channels per CUDA block: thread (step slice sl = tid / 4, channel
// quad cq = tid % 4) reads the 16 bytes of channels 4cq .. 4cq+3 at steps sl, sl + 64, ...;
// butterflies over the lanes of equal cq (offsets 16, 8, 4), then the 8 warps' partials are
// added in warp order. A8: int32 dp4a sums (exact); else float FMA chains.
template <int MMAX, bool A8>
struct W8Gemv {
  using Ctx = W8Ctx;
  static constexpr int kRed = MMAX * 4;
  static constexpr int kRedMinOff = 4;
  using Red = typename std::conditional<A8, int32_t, float>::type;
  QK_HD static Red combine(Red a, Red b) { return a + b; }
  QK_HD static bool is_reduce(const Ctx&, int s) { return s == 1; }
  struct State {
    Red red[kRed];
  };
  static size_t smem_bytes(const Ctx&) { return region_bytes<Red>(kWarps * MMAX * 16); }
  static int64_t blocks(const Ctx& c) { return c.nblk; }
  QK_HD static int num_steps(const Ctx&) { return 4; }

  QK_HD static void step(const Ctx& c, int64_t block, int tid, int s, State& state,
                         unsigned char* smem) {
    Carver cv{smem};
    const Sm<Red> P = cv.take<Red>(kWarps * MMAX * 16);
    const int cq = tid % 4, lane = tid % 32, warp = tid / 32;
    if (s == 0) {
      for (int64_t step = tid / 4; step < c.kp / 4; step += kThreads / 4) {
        const uint4 w = ldv<uint4>(c.packed, c.word_offset(block, step, 4 * cq), c.packed_bytes());
        if constexpr (A8) {
#pragma unroll
          for (int mi = 0; mi < MMAX; ++mi) {
            if (mi >= c.m) break;
            const uint32_t xw = ldv<uint32_t>(c.xq, mi * c.kp + 4 * step, c.m * c.kp);
#pragma unroll
            for (int ch = 0; ch < 4; ++ch)
              state.red[mi * 4 + ch] = mm::dot4_s8(comp(w, ch), xw, state.red[mi * 4 + ch]);
          }
        } else {
          float wf[4][4];
#pragma unroll
          for (int ch = 0; ch < 4; ++ch)
#pragma unroll
            for (int t = 0; t < 4; ++t) wf[ch][t] = mm::float_of_s8(comp(w, ch), t);
#pragma unroll
          for (int mi = 0; mi < MMAX; ++mi) {
            if (mi >= c.m) break;
            const float4 xv = c.x4(mi, 4 * step);
#pragma unroll
            for (int ch = 0; ch < 4; ++ch)
#pragma unroll
              for (int t = 0; t < 4; ++t)
                state.red[mi * 4 + ch] = fmaf(comp(xv, t), wf[ch][t], state.red[mi * 4 + ch]);
          }
        }
      }
    } else if (s == 2) {
      if (lane < 4)
        for (int mi = 0; mi < MMAX; ++mi)
          for (int ch = 0; ch < 4; ++ch)
            P[(warp * MMAX + mi) * 16 + 4 * lane + ch] = state.red[mi * 4 + ch];
    } else if (s == 3) {
      if (tid >= c.m * 16) return;
      const int mi = tid / 16, j = tid % 16;
      const int64_t col = block * 16 + j;
      if (col >= c.n) return;
      Red acc = P[mi * 16 + j];
      for (int w = 1; w < kWarps; ++w) acc = acc + P[(w * MMAX + mi) * 16 + j];
      const float sw = ld(c.w_scale, col, c.n);
      if constexpr (A8) {
        st(c.y, mi * c.n + col, c.m * c.n, mm::w8a8_value(acc, ld(c.sx, mi, c.m), sw, c.bias, col));
      } else {
        st(c.y, mi * c.n + col, c.m * c.n, mm::w8a16_value(acc, sw, c.bias, col));
      }
    }
  }
};

// GEMM: 64 rows of x x 64 channels (4 channel blocks) per CUDA block, 4 x 4 per thread, 8
// steps (32 k) per pair of kernel steps. A8: Xq[w][row], Wq[w][col] int8x4 words, dp4a;
// else Xs[kk][row], Ws[kk][col] floats and one FMA chain per output in k order.
template <bool A8>
struct W8Gemm : NoReduce {
  using Ctx = W8Ctx;
  struct State {
    Red red[kRed];
    float a[4][4];
    int32_t ai[4][4];
  };
  static size_t smem_bytes(const Ctx&) {
    return A8 ? 2 * region_bytes<uint32_t>(512) : 2 * region_bytes<float>(2048);
  }
  static int64_t blocks(const Ctx& c) { return c.nbm * ((c.nblk + 3) / 4); }
  QK_HD static int64_t nchunks(const Ctx& c) { return (c.kp + 31) / 32; }
  QK_HD static int num_steps(const Ctx& c) { return static_cast<int>(2 * nchunks(c) + 1); }

  QK_HD static void step(const Ctx& c, int64_t block, int tid, int s, State& state,
                         unsigned char* smem) {
    const int64_t m0 = (block % c.nbm) * 64, blk0 = (block / c.nbm) * 4;
    const int ty = tid / 16, tx = tid % 16;
    Carver cv{smem};
    if (s == 2 * nchunks(c)) {
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          const int64_t mi = m0 + ty * 4 + i, n = blk0 * 16 + tx * 4 + j;
          if (mi >= c.m || n >= c.n) continue;
          const float sw = ld(c.w_scale, n, c.n);
          const float v = A8 ? mm::w8a8_value(state.ai[i][j], ld(c.sx, mi, c.m), sw, c.bias, n)
                             : mm::w8a16_value(state.a[i][j], sw, c.bias, n);
          st(c.y, mi * c.n + n, c.m * c.n, v);
        }
      return;
    }
    const int64_t kc = (s / 2) * 32;  // first k of the chunk
    if (s % 2 == 0) {
      uint32_t wwords[2];
      int wcol[2], wstep[2];
      for (int e = 0; e < 2; ++e) {
        const int idx = tid + kThreads * e, cb = idx / 128, sw = (idx / 16) % 8, j = idx % 16;
        const int64_t blk = blk0 + cb, step = kc / 4 + sw;
        wwords[e] = blk < c.nblk && step < c.kp / 4
                        ? ldv<uint32_t>(c.packed, c.word_offset(blk, step, j), c.packed_bytes())
                        : 0u;
        wcol[e] = cb * 16 + j;
        wstep[e] = sw;
      }
      if constexpr (A8) {
        const Sm<uint32_t> Xq = cv.take<uint32_t>(512), Wq = cv.take<uint32_t>(512);
        for (int e = 0; e < 2; ++e) {
          const int idx = tid + kThreads * e, row = idx % 64, w = idx / 64;
          const int64_t mi = m0 + row, step = kc / 4 + w;
          Xq[w * 64 + row] = mi < c.m && step < c.kp / 4
                                 ? ldv<uint32_t>(c.xq, mi * c.kp + 4 * step, c.m * c.kp)
                                 : 0u;
          Wq[wstep[e] * 64 + wcol[e]] = wwords[e];
        }
      } else {
        const Sm<float> Xs = cv.take<float>(2048), Ws = cv.take<float>(2048);
        for (int e = 0; e < 2; ++e) {
          const int idx = tid + kThreads * e, row = idx % 64, q = idx / 64;
          const int64_t mi = m0 + row;
          const float4 v = mi < c.m ? c.x4(mi, kc + 4 * q) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          for (int t = 0; t < 4; ++t) {
            Xs[(4 * q + t) * 64 + row] = comp(v, t);
            Ws[(4 * wstep[e] + t) * 64 + wcol[e]] = mm::float_of_s8(wwords[e], t);
          }
        }
      }
      return;
    }
    if constexpr (A8) {
      const Sm<uint32_t> Xq = cv.take<uint32_t>(512), Wq = cv.take<uint32_t>(512);
#pragma unroll
      for (int w = 0; w < 8; ++w) {
        const uint4 xw = Xq.vec<uint4>(w * 64 + ty * 4), ww = Wq.vec<uint4>(w * 64 + tx * 4);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            state.ai[i][j] = mm::dot4_s8(comp(ww, j), comp(xw, i), state.ai[i][j]);
      }
    } else {
      // Chunk positions beyond k hold x = 0 and w = 0: fma(0, 0, acc) == acc (acc is never
      // -0.0: the chain starts at +0.0 and a sum that cancels rounds to +0.0).
      const Sm<float> Xs = cv.take<float>(2048), Ws = cv.take<float>(2048);
#pragma unroll 4
      for (int kk = 0; kk < 32; ++kk) {
        const float4 xa = Xs.vec<float4>(kk * 64 + ty * 4), wa = Ws.vec<float4>(kk * 64 + tx * 4);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            state.a[i][j] = fmaf(comp(xa, i), comp(wa, j), state.a[i][j]);
      }
    }
  }
};

}  // namespace gemm
}  // namespace cuda
}  // namespace qk
