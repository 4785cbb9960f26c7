// Fused LSQ / LSQ+ fake quantization, forward and backward (the per-element rule is
// core/fakequant.h). Layout: x is (outer, C, inner) row-major float32 with one step size
// scale[c] (and, optionally, one offset beta[c]) per c: per tensor is C = 1; per channel along
// axis a of a tensor is outer = prod(shape[:a]), C = shape[a], inner = prod(shape[a+1:]);
// group-wise is per channel along axis 0 of x viewed as (rows * groups, group_size).
// Torch-free.
//
// The backward makes one pass over x and grad_y (the masks are recomputed, nothing is saved by
// the forward) and returns grad_x and the per-channel sums
//   grad_scale[c]  = g * sum(grad_y * d y / d s),   grad_offset[c] = g * sum(grad_y outside)
// (g: LSQ's gradient scale, 1 / sqrt(N * Q_P) in LSQ; the caller's choice). Sums are
// accumulated in double, in an order fixed by the shape alone: runs of at most kFqChunk elements
// of one channel, each summed in 8 interleaved lanes (element i of a run into lane i % 8, lanes
// combined pairwise), the runs' sums then added in memory order; along the last axis (inner ==
// 1, C > 1) fixed blocks of rows, each summed row by row per channel, then the blocks in order.
// So the sums do not depend on the thread count, and the scalar, AVX2 and AVX-512 paths give
// bit-identical results (the products grad_y * term are exact in double).
#pragma once
#include <cstdint>

namespace qk {

// Elements per run of one channel in the backward's sums (a multiple of 16).
constexpr int64_t kFqChunk = 16384;

// y = fake_quantize(x); offset may be null (no beta). scale: C positive finite floats (the
// bindings check), q_n >= 0, q_p > 0. x and y may be the same array.
void fake_quantize_f32(const float* x, const float* scale, const float* offset, int64_t outer,
                       int64_t channels, int64_t inner, int32_t q_n, int32_t q_p, float* y);

// grad_x (may alias grad_y), grad_scale[C] and grad_offset[C] (may be null: not computed).
void fake_quantize_backward_f32(const float* x, const float* grad_y, const float* scale,
                                const float* offset, int64_t outer, int64_t channels,
                                int64_t inner, int32_t q_n, int32_t q_p, double grad_factor,
                                float* grad_x, float* grad_scale, float* grad_offset);

}  // namespace qk
