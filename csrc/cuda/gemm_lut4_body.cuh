// Kernel bodies of the 4-bit lookup-table matmul (gemm_lut4): GEMV, GEMM.
// Written in the execution model of gemm_body.cuh; gemm.cu runs them on the device or on its
// host emulator.
#pragma once
#include "cuda/gemm_body.cuh"

namespace qk {
namespace cuda {
namespace gemm {

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

}  // namespace gemm
}  // namespace cuda
}  // namespace qk
