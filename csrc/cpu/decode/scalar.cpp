// The scalar decode-step kernels: the reference loops (float32, positions and elements in
// order, std::exp), and the tails of the SIMD paths.
#include <cmath>

#include "cpu/decode/kernels.h"

namespace qk {
namespace decode {

void norm_row_scalar(const float* x, const float* res, const float* w, int64_t n, float eps,
                     float* sum, float* out) {
  float ss = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float s = res ? x[i] + res[i] : x[i];
    if (res) sum[i] = s;
    ss += s * s;
  }
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  const float* s = res ? sum : x;
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (s[i] * r);
}

float silu_mul_one(float g, float u) { return g / (1.0f + std::exp(-g)) * u; }

void rope_scalar(const float* x, const float* cos, const float* sin, int64_t d, float* out) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; ++i) {
    out[i] = x[i] * cos[i] - x[i + h] * sin[i];
    out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h];
  }
}

namespace {

void silu_mul_scalar(const float* g, const float* u, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = silu_mul_one(g[i], u[i]);
}

void attend_one(const float* q, const float* k, const float* v, int64_t n, int64_t d,
                float scale, float* s, float* y) {
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    float t = 0.0f;
    for (int64_t i = 0; i < d; ++i) t += q[i] * k[j * d + i];
    s[j] = t * scale;
    m = s[j] > m ? s[j] : m;
  }
  float z = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    z += s[j];
  }
  const float inv = 1.0f / z;
  for (int64_t i = 0; i < d; ++i) {
    float acc = 0.0f;
    for (int64_t j = 0; j < n; ++j) acc += s[j] * v[j * d + i];
    y[i] = acc * inv;
  }
}

void attend_scalar(const float* q, int64_t heads, const float* k, const float* v, int64_t n,
                   int64_t d, float scale, float* s, float* y) {
  for (int64_t h = 0; h < heads; ++h)
    attend_one(q + h * d, k, v, n, d, scale, s + h * n, y + h * d);
}

}  // namespace

const Kernels kScalarKernels = {norm_row_scalar, silu_mul_scalar, rope_scalar,
                                attend_scalar};

}  // namespace decode
}  // namespace qk
