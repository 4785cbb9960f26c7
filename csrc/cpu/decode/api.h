// The float32 pieces of a transformer decode step that sit between its matmuls: RMSNorm (with
// the residual add before it), SwiGLU's SiLU(gate) * up, and attention of one new position per
// sequence over a KV cache (rotate-half RoPE on the query and key, the key and value written
// into the cache, softmax over every cached position). Eager torch runs these as ~25 small ops
// per layer, each paying its dispatch and, after a GEMV has streamed the weights through the
// caches, cold code; here they are 3 calls (docs/speed.md). Torch-free.
//
// Numerics (every ISA; the tests compare each against float64 references): RoPE is
// x * cos - x[i + d/2] * sin (first half) and x * cos + x[i - d/2] * sin (second half), a
// product, a product and an add / subtract, each rounded: bit for bit what eager torch's
// q * cos + rotate_half(q) * sin gives. Sums (the mean square, the dot products, the softmax
// denominator, the weighted values) run in float32 in an ISA-specific order, and the SIMD paths'
// exp is a polynomial within 2 ulp of expf: results differ from torch's in the last bits only.
#pragma once
#include <cstdint>

namespace qk {

// out = w * (s * r) per row of n, with s = x + res (x alone when res is null) and
// r = 1 / sqrt(mean(s * s) + eps); s is written to sum when res is given (sum may be x or res).
// x, res, sum, out: (rows, n); w: (n). out must not overlap the inputs.
void rms_norm_f32(const float* x, const float* res, const float* w, int64_t rows, int64_t n,
                  float eps, float* sum, float* out);

// out[i] = g[i] / (1 + exp(-g[i])) * u[i]: SiLU(gate) * up, n values (out may be g or u).
void silu_mul_f32(const float* g, const float* u, int64_t n, float* out);

// One decode step of attention for `batch` sequences that share the position `pos`.
struct AttentionStep {
  int64_t batch, heads, kv_heads, head_dim;  // heads a multiple of kv_heads, head_dim even
  int64_t max_len, pos;                      // the caches hold max_len positions; 0 <= pos
  float scale;                               // the scores' factor, usually 1 / sqrt(head_dim)
};

// q: (batch, heads, head_dim); k, v: (batch, kv_heads, head_dim), this position's; cos, sin:
// (head_dim), the rotate-half tables' row for pos; k_cache, v_cache: (batch, kv_heads, max_len,
// head_dim). Writes RoPE(k) and v at position pos of the caches, then for every head h (kv head
// h / (heads / kv_heads)) y = softmax(scale * RoPE(q) . K[0..pos]) V[0..pos]: (batch, heads,
// head_dim). y must not overlap the other arrays.
void attention_step_f32(const AttentionStep& a, const float* q, const float* k, const float* v,
                        const float* cos, const float* sin, float* k_cache, float* v_cache,
                        float* y);

}  // namespace qk
