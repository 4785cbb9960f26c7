// Kernel bodies of the int8-weight matmuls (gemm_w8a8, gemm_w8a16): row quantization, GEMV, GEMM.
// Written in the execution model of gemm_body.cuh; gemm.cu runs them on the device or on its
// host emulator.
#pragma once
#include "cuda/gemm_body.cuh"

namespace qk {
namespace cuda {
namespace gemm {

// ================================================================================================
// int8 weights (qkern::gemm_w8a8, qkern::gemm_w8a16), packed in blocks of 16 output channels
// x 4 consecutive k (csrc/cpu/gemm/w8/api.h): packed[b * 16 * kp + s * 64 + j * 4 + t].
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
