// Kernel bodies of the int4 group-wise matmul (gemm_w4): activation quantization, GEMV, GEMM.
// Written in the execution model of gemm_body.cuh; gemm.cu runs them on the device or on its
// host emulator.
#pragma once
#include "cuda/gemm_body.cuh"

namespace qk {
namespace cuda {
namespace gemm {

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

}  // namespace gemm
}  // namespace cuda
}  // namespace qk
