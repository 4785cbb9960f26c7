// Internal interface of the decode-step family (api.h): the per-ISA kernel table and the
// vector-width-generic loops that the SIMD paths instantiate with their own vector type V, a
// simd::F32x8 / F32x16 (cpu/runtime/simd_f32.h) plus fmadd, max, hsum, round and pow2.
#pragma once
#include <cstdint>

#include "cpu/decode/api.h"
#include "cpu/runtime/isa.h"

namespace qk {
namespace decode {

struct Kernels {
  // one row of rms_norm_f32 (api.h)
  void (*norm_row)(const float* x, const float* res, const float* w, int64_t n, float eps,
                   float* sum, float* out);
  void (*silu_mul)(const float* g, const float* u, int64_t n, float* out);
  // out = RoPE(x) of one head (head_dim d, even); out must not overlap x
  void (*rope)(const float* x, const float* cos, const float* sin, int64_t d, float* out);
  // `heads` query heads (q, y: heads x d) sharing one KV head: per head s_j = scale * q . k_j
  // for the n rows of k (row stride d), then y = sum_j exp(s_j - max s) v_j / sum_j exp(s_j -
  // max s); scores: heads x n floats of scratch
  void (*attend)(const float* q, int64_t heads, const float* k, const float* v, int64_t n,
                 int64_t d, float scale, float* scores, float* y);
};

extern const Kernels kScalarKernels;  // scalar.cpp
const Kernels* avx2_kernels();        // avx2.cpp
const Kernels* avx512_kernels();      // avx512.cpp

inline const Kernels& kernels() {
  const Kernels* const by_isa[] = {&kScalarKernels, avx2_kernels(), avx512_kernels()};
  return pick(by_isa);
}

// The scalar kernels (scalar.cpp); the SIMD ones take them for tails below their width.
void norm_row_scalar(const float* x, const float* res, const float* w, int64_t n, float eps,
                     float* sum, float* out);
float silu_mul_one(float g, float u);
void rope_scalar(const float* x, const float* cos, const float* sin, int64_t d, float* out);

// exp(x) for x in float: Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial
// in r, times 2^n); x is clamped to [-87.3, 88.3] first (exp is then 1.2e-38 .. 2.1e38).
template <class V>
inline typename V::T exp(typename V::T x) {
  x = V::max(V::min(x, V::set1(88.3762626647949f)), V::set1(-87.3365478515625f));
  const auto n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  auto r = V::fmadd(n, V::set1(-0.693359375f), x);
  r = V::fmadd(n, V::set1(2.12194440e-4f), r);
  auto p = V::set1(1.9875691500e-4f);
  p = V::fmadd(p, r, V::set1(1.3981999507e-3f));
  p = V::fmadd(p, r, V::set1(8.3334519073e-3f));
  p = V::fmadd(p, r, V::set1(4.1665795894e-2f));
  p = V::fmadd(p, r, V::set1(1.6666665459e-1f));
  p = V::fmadd(p, r, V::set1(5.0000001201e-1f));
  p = V::add(V::fmadd(p, V::mul(r, r), r), V::set1(1.0f));
  return V::mul(p, V::pow2(n));
}

template <class V>
void norm_row(const float* x, const float* res, const float* w, int64_t n, float eps, float* sum,
              float* out) {
  const int64_t nv = n / V::kW * V::kW;
  auto acc = V::set1(0.0f);
  for (int64_t i = 0; i < nv; i += V::kW) {
    auto s = V::load(x + i);
    if (res) {
      s = V::add(s, V::load(res + i));
      V::store(sum + i, s);
    }
    acc = V::fmadd(s, s, acc);
  }
  float ss = V::hsum(acc);
  for (int64_t i = nv; i < n; ++i) {
    const float s = res ? x[i] + res[i] : x[i];
    if (res) sum[i] = s;
    ss += s * s;
  }
  const float r = 1.0f / __builtin_sqrtf(ss / static_cast<float>(n) + eps);
  const float* s = res ? sum : x;
  const auto vr = V::set1(r);
  for (int64_t i = 0; i < nv; i += V::kW)
    V::store(out + i, V::mul(V::load(w + i), V::mul(V::load(s + i), vr)));
  for (int64_t i = nv; i < n; ++i) out[i] = w[i] * (s[i] * r);
}

template <class V>
void silu_mul(const float* g, const float* u, int64_t n, float* out) {
  const int64_t nv = n / V::kW * V::kW;
  const auto one = V::set1(1.0f), zero = V::set1(0.0f);
  for (int64_t i = 0; i < nv; i += V::kW) {
    const auto a = V::load(g + i);
    const auto e = exp<V>(V::sub(zero, a));
    V::store(out + i, V::mul(V::div(a, V::add(one, e)), V::load(u + i)));
  }
  for (int64_t i = nv; i < n; ++i) out[i] = silu_mul_one(g[i], u[i]);
}

template <class V>
void rope(const float* x, const float* cos, const float* sin, int64_t d, float* out) {
  const int64_t h = d / 2, hv = h / V::kW * V::kW;
  for (int64_t i = 0; i < hv; i += V::kW) {
    const auto a = V::load(x + i), b = V::load(x + i + h);
    V::store(out + i, V::sub(V::mul(a, V::load(cos + i)), V::mul(b, V::load(sin + i))));
    V::store(out + i + h,
             V::add(V::mul(b, V::load(cos + i + h)), V::mul(a, V::load(sin + i + h))));
  }
  for (int64_t i = hv; i < h; ++i) {
    out[i] = x[i] * cos[i] - x[i + h] * sin[i];
    out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h];
  }
}

// Query heads that share a KV head are taken kGroup at a time: each cached key and value row
// is read once for all of them (grouped-query attention reads its cache rep times less).
constexpr int kGroup = 4;

// s[r][j] = scale * q_r . k_j for R query heads (rows of q, stride d) and the n rows of k; m[r]:
// the largest of head r's.
template <class V, int R>
void group_scores(const float* q, const float* k, int64_t n, int64_t d, float scale, float* s,
                  float* m) {
  const int64_t dv = d / V::kW * V::kW;
  float mx[R];  // the running maxima in registers (m may alias s)
  for (int r = 0; r < R; ++r) mx[r] = -__builtin_inff();
  for (int64_t j = 0; j < n; ++j) {
    const float* kj = k + j * d;
    typename V::T acc[R], acc2[R];  // two chains per head: even and odd vectors
    for (int r = 0; r < R; ++r) acc[r] = acc2[r] = V::set1(0.0f);
    int64_t i = 0;
    for (; i + 2 * V::kW <= dv; i += 2 * V::kW) {
      const auto k0 = V::load(kj + i), k1 = V::load(kj + i + V::kW);
      for (int r = 0; r < R; ++r) {
        acc[r] = V::fmadd(V::load(q + r * d + i), k0, acc[r]);
        acc2[r] = V::fmadd(V::load(q + r * d + i + V::kW), k1, acc2[r]);
      }
    }
    if (i < dv)
      for (int r = 0; r < R; ++r)
        acc[r] = V::fmadd(V::load(q + r * d + i), V::load(kj + i), acc[r]);
    for (int r = 0; r < R; ++r) {
      float t = V::hsum(V::add(acc[r], acc2[r]));
      for (int64_t i = dv; i < d; ++i) t += q[r * d + i] * kj[i];
      t *= scale;
      s[r * n + j] = t;
      mx[r] = t > mx[r] ? t : mx[r];
    }
  }
  for (int r = 0; r < R; ++r) m[r] = mx[r];
}

// s <- exp(s - m) over n scores (m: their largest); returns their sum.
template <class V>
float softmax_exp(float* s, int64_t n, float m) {
  const int64_t nv = n / V::kW * V::kW;
  const auto vm = V::set1(m);
  auto z = V::set1(0.0f);
  for (int64_t j = 0; j < nv; j += V::kW) {
    const auto e = exp<V>(V::sub(V::load(s + j), vm));
    V::store(s + j, e);
    z = V::add(z, e);
  }
  float zs = V::hsum(z);
  for (int64_t j = nv; j < n; ++j) {  // the tail through the same vector exp, one lane used
    float lane[V::kW] = {};
    lane[0] = s[j] - m;
    V::store(lane, exp<V>(V::load(lane)));
    s[j] = lane[0];
    zs += s[j];
  }
  return zs;
}

// Columns [i, i + C kW) of y_r = sum_j s[r][j] v_j / z_r for R heads: the R x C sums in
// registers through all n positions, each value row's C vectors loaded once for the R heads.
template <class V, int R, int C>
void values_chunk(const float* s, const float* v, int64_t n, int64_t d, int64_t i,
                  const float* inv, float* y) {
  typename V::T acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V::set1(0.0f);
  for (int64_t j = 0; j < n; ++j) {
    typename V::T vv[C];
    for (int c = 0; c < C; ++c) vv[c] = V::load(v + j * d + i + c * V::kW);
    for (int r = 0; r < R; ++r) {
      const auto p = V::set1(s[r * n + j]);
      for (int c = 0; c < C; ++c) acc[r][c] = V::fmadd(p, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      V::store(y + r * d + i + c * V::kW, V::mul(acc[r][c], V::set1(inv[r])));
}

// y_r = sum_j s[r][j] v_j / z_r for R heads, C = 4 (R <= 2) or 2 vectors of columns at a time.
template <class V, int R>
void group_values(const float* s, const float* v, int64_t n, int64_t d, const float* z,
                  float* y) {
  constexpr int C = R <= 2 ? 4 : 2;
  float inv[R];
  for (int r = 0; r < R; ++r) inv[r] = 1.0f / z[r];
  int64_t i = 0;
  for (; i + C * V::kW <= d; i += C * V::kW) values_chunk<V, R, C>(s, v, n, d, i, inv, y);
  for (; i + V::kW <= d; i += V::kW) values_chunk<V, R, 1>(s, v, n, d, i, inv, y);
  for (int r = 0; r < R; ++r)
    for (int64_t t = i; t < d; ++t) {
      float acc = 0.0f;
      for (int64_t j = 0; j < n; ++j) acc += s[r * n + j] * v[j * d + t];
      y[r * d + t] = acc * inv[r];
    }
}

template <class V, int R>
void attend_group(const float* q, const float* k, const float* v, int64_t n, int64_t d,
                  float scale, float* s, float* y) {
  float m[R], z[R];
  group_scores<V, R>(q, k, n, d, scale, s, m);
  for (int r = 0; r < R; ++r) z[r] = softmax_exp<V>(s + r * n, n, m[r]);
  group_values<V, R>(s, v, n, d, z, y);
}

// One query head alone (no other head shares its KV head, as in multi-head attention).
template <class V>
void attend_one(const float* q, const float* k, const float* v, int64_t n, int64_t d,
                float scale, float* s, float* y) {
  float m;
  group_scores<V, 1>(q, k, n, d, scale, s, &m);
  const float zs = softmax_exp<V>(s, n, m);
  const auto inv = V::set1(1.0f / zs);
  constexpr int64_t kAcc = 4;  // value vectors kept in registers per pass over the positions
  int64_t i = 0;
  for (; i + kAcc * V::kW <= d; i += kAcc * V::kW) {
    typename V::T acc[kAcc];
    for (int64_t r = 0; r < kAcc; ++r) acc[r] = V::set1(0.0f);
    for (int64_t j = 0; j < n; ++j) {
      const auto p = V::set1(s[j]);
      for (int64_t r = 0; r < kAcc; ++r)
        acc[r] = V::fmadd(p, V::load(v + j * d + i + r * V::kW), acc[r]);
    }
    for (int64_t r = 0; r < kAcc; ++r) V::store(y + i + r * V::kW, V::mul(acc[r], inv));
  }
  for (; i + V::kW <= d; i += V::kW) {
    auto acc = V::set1(0.0f);
    for (int64_t j = 0; j < n; ++j) acc = V::fmadd(V::set1(s[j]), V::load(v + j * d + i), acc);
    V::store(y + i, V::mul(acc, inv));
  }
  for (; i < d; ++i) {
    float acc = 0.0f;
    for (int64_t j = 0; j < n; ++j) acc += s[j] * v[j * d + i];
    y[i] = acc * (1.0f / zs);
  }
}

template <class V>
void attend(const float* q, int64_t heads, const float* k, const float* v, int64_t n, int64_t d,
            float scale, float* s, float* y) {
  // a lone head (multi-head attention): attend_one, whose value loop ran faster than
  // group_values<V, 1> on 4096 cached positions (docs/speed.md "Seventeenth pass")
  if (heads == 1) return attend_one<V>(q, k, v, n, d, scale, s, y);
  for (int64_t h = 0; h < heads; h += kGroup) {
    const float* qh = q + h * d;
    float *sh = s + h * n, *yh = y + h * d;
    switch (heads - h < kGroup ? heads - h : kGroup) {
      case 1: attend_group<V, 1>(qh, k, v, n, d, scale, sh, yh); break;
      case 2: attend_group<V, 2>(qh, k, v, n, d, scale, sh, yh); break;
      case 3: attend_group<V, 3>(qh, k, v, n, d, scale, sh, yh); break;
      default: attend_group<V, 4>(qh, k, v, n, d, scale, sh, yh); break;
    }
  }
}

}  // namespace decode
}  // namespace qk
