// CUDA kernels of qkern (see kernels.cuh). Every value is computed by the QK_HD functions of
// csrc/core, compiled with --fmad=false and IEEE division, so codes and scales match the CPU
// bit for bit. The only order-dependent statistic, sum|x| in double (kScaleMeanAbs), is summed
// by one thread per group in element order, as on the CPU; min/max reductions are order-free.
#include "cuda/kernels.cuh"

#include <cstdint>

#include "cuda/launch.cuh"

namespace qk {
namespace cuda {
namespace {

using namespace detail;  // NOLINT: launch helpers


// ---- per-format quantizers -----------------------------------------------------------------
// bind(): run by every thread of the block first (may stage tables in shared memory).
// params(): scale / zero point from the group statistics (lo = -neg and hi = pos are already
// clipped at zero, which affine_params_from_stats does anyway). code(): one element.

struct AffineOp {
  AffineSpec spec;
  int rule;
  float qpos;
  int emax;
  __device__ void bind() {}
  __device__ bool needs_sum() const { return rule == kScaleMeanAbs; }
  __device__ void params(float neg, float pos, float amax, double sum_abs, int64_t group,
                         float* scale, int32_t* zp) const {
    affine_params_from_stats(-neg, pos, amax, sum_abs, group, rule, qpos, emax, spec, scale, zp);
  }
  __device__ uint8_t code(float t, int32_t zp, uint64_t index) const {
    return static_cast<uint8_t>(affine_code(t, zp, spec, index));
  }
};

struct CodebookOp {
  CodebookSpec spec;  // values / codes in device memory until bind() moves them to shared
  int rule;
  float max_value;
  int emax;
  __device__ void bind() {
    __shared__ float s_values[256];
    __shared__ uint8_t s_codes[256];
    for (int i = threadIdx.x; i < spec.n; i += blockDim.x) {
      s_values[i] = spec.values[i];
      s_codes[i] = spec.codes[i];
    }
    __syncthreads();
    spec.values = s_values;
    spec.codes = s_codes;
  }
  __device__ bool needs_sum() const { return rule == kScaleMeanAbs; }
  __device__ void params(float neg, float pos, float amax, double sum_abs, int64_t group,
                         float* scale, int32_t* zp) const {
    const AffineSpec unused{0, 0, 0, 0, 0.0f, 0};  // as the CPU: only kScaleMinMax reads it
    affine_params_from_stats(-neg, pos, amax, sum_abs, group, rule, max_value, emax, unused,
                             scale, zp);
    *zp = 0;
  }
  __device__ uint8_t code(float t, int32_t, uint64_t index) const {
    return codebook_code(t, spec, index);
  }
};

// ---- element-wise kernels over grouped data --------------------------------------------------

template <class T> struct Vec4;
template <> struct Vec4<float> { using type = float4; };
template <> struct Vec4<uint8_t> { using type = uchar4; };

// Grid-stride over runs of 4 consecutive elements (one vector load / store each when kVec):
// out[i] = f(in[i], g, i) with g = i / group.
template <bool kVec, class In, class Out, class F>
__device__ __forceinline__ void map_grouped(const In* __restrict__ in, Out* __restrict__ out,
                                            int64_t n, int64_t group, F f) {
  using VI = typename Vec4<In>::type;
  using VO = typename Vec4<Out>::type;
  for (int64_t r = thread_id(); r < (n + 3) / 4; r += grid_stride()) {
    const int64_t i0 = r * 4;
    const bool full = kVec && i0 + 4 <= n;
    In a[4] = {};
    if (full) {
      const VI v = reinterpret_cast<const VI*>(in)[r];
      a[0] = v.x; a[1] = v.y; a[2] = v.z; a[3] = v.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) if (i0 + j < n) a[j] = in[i0 + j];
    }
    Out b[4] = {};
    int64_t g = i0 / group, k = i0 - g * group;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (i0 + j < n) b[j] = f(a[j], g, i0 + j);
      if (++k == group) { k = 0; ++g; }
    }
    if (full) {
      reinterpret_cast<VO*>(out)[r] = VO{b[0], b[1], b[2], b[3]};
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) if (i0 + j < n) out[i0 + j] = b[j];
    }
  }
}

// Quantization with known scales (also the last pass of the big-group dynamic path).
template <class Op, bool kVec>
__global__ void __launch_bounds__(kThreads)
quantize_static_kernel(const float* __restrict__ x, int64_t n, int64_t group,
                       const float* __restrict__ scale, const int32_t* __restrict__ zp, Op op,
                       uint8_t* __restrict__ codes, int* bad) {
  op.bind();
  bool any_bad = false;
  map_grouped<kVec>(x, codes, n, group, [&](float v, int64_t g, int64_t i) {
    any_bad |= !isfinite(v);
    return op.code(v * (1.0f / scale[g]), zp ? zp[g] : 0, static_cast<uint64_t>(i));
  });
  if (any_bad && bad) *bad = 1;
}

template <class Op>
cudaError_t launch_static(const float* x, int64_t n, int64_t group, const float* scale,
                          const int32_t* zp, const Op& op, uint8_t* codes, int* bad,
                          cudaStream_t stream) {
  cudaError_t err = begin(n, group, bad, stream);
  if (err != cudaSuccess || n == 0) return err;
  auto kernel = aligned(x, 16) && aligned(codes, 4) ? quantize_static_kernel<Op, true>
                                                    : quantize_static_kernel<Op, false>;
  return launch(kernel, (n + 3) / 4, stream, x, n, group, scale, zp, op, codes, bad);
}

template <bool kVec, bool kLut>
__global__ void __launch_bounds__(kThreads)
dequantize_kernel(const uint8_t* __restrict__ codes, int64_t n, int64_t group,
                  const float* __restrict__ scale, const int32_t* __restrict__ zp,
                  bool is_signed, float offset, const float* __restrict__ lut,
                  float* __restrict__ out) {
  __shared__ float s_lut[kLut ? 256 : 1];
  if (kLut) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_lut[i] = lut[i];
    __syncthreads();
  }
  map_grouped<kVec>(codes, out, n, group, [&](uint8_t c, int64_t g, int64_t) {
    if (kLut) return s_lut[c] * scale[g];
    const int32_t q = is_signed ? static_cast<int32_t>(static_cast<int8_t>(c)) : c;
    return affine_value(q, zp ? zp[g] : 0, offset, scale[g]);
  });
}

template <bool kLut>
cudaError_t launch_dequantize(const uint8_t* codes, int64_t n, int64_t group,
                              const float* scale, const int32_t* zp, bool is_signed,
                              float offset, const float* lut, float* out, cudaStream_t stream) {
  cudaError_t err = begin(n, group, nullptr, stream);
  if (err != cudaSuccess || n == 0) return err;
  auto kernel = aligned(codes, 4) && aligned(out, 16) ? dequantize_kernel<true, kLut>
                                                      : dequantize_kernel<false, kLut>;
  return launch(kernel, (n + 3) / 4, stream, codes, n, group, scale, zp, is_signed, offset, lut,
                out);
}

// ---- dynamic scales ----------------------------------------------------------------------------

// Group statistics, all >= 0 so that their float order is their int order (for atomicMax):
// neg = max(-x, 0), pos = max(x, 0), amax = max|x|. fmaxf skips NaN (the flag reports it).
struct Stats3 {
  float neg, pos, amax;
  __device__ void add(float v) {
    neg = fmaxf(neg, -v);
    pos = fmaxf(pos, v);
    amax = fmaxf(amax, fabsf(v));
  }
  __device__ void merge(const Stats3& o) {
    neg = fmaxf(neg, o.neg);
    pos = fmaxf(pos, o.pos);
    amax = fmaxf(amax, o.amax);
  }
};

// Maximum over the warp (all lanes get it).
__device__ __forceinline__ void warp_max(Stats3& s) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    s.merge({__shfl_xor_sync(0xffffffffu, s.neg, o), __shfl_xor_sync(0xffffffffu, s.pos, o),
             __shfl_xor_sync(0xffffffffu, s.amax, o)});
  }
}

// Maximum over the block (all threads get it); every thread of the block must call it.
__device__ __forceinline__ void block_max(Stats3& s) {
  warp_max(s);
  __shared__ Stats3 parts[kThreads / kWarp];
  __syncthreads();  // earlier readers of parts are done
  if (threadIdx.x % kWarp == 0) parts[threadIdx.x / kWarp] = s;
  __syncthreads();
  for (int i = 0; i < kThreads / kWarp; ++i) s.merge(parts[i]);
}

// sum |x| of one group in double, element by element (the CPU's order).
__device__ double sum_abs_in_order(const float* __restrict__ xg, int64_t group) {
  double sum = 0.0;
#pragma unroll 8
  for (int64_t j = 0; j < group; ++j) sum += fabs(static_cast<double>(xg[j]));
  return sum;
}

// One warp per group: reduce, compute the group's parameters, quantize the group.
template <class Op>
__global__ void __launch_bounds__(kThreads)
dynamic_warp_kernel(const float* __restrict__ x, int64_t ngroups, int64_t group, Op op,
                    float* __restrict__ scale_out, int32_t* __restrict__ zp_out,
                    uint8_t* __restrict__ codes, int* bad) {
  op.bind();
  constexpr int kWarps = kThreads / kWarp;
  const int lane = threadIdx.x % kWarp;
  bool any_bad = false;
  for (int64_t g = int64_t{blockIdx.x} * kWarps + threadIdx.x / kWarp; g < ngroups;
       g += int64_t{gridDim.x} * kWarps) {
    const float* xg = x + g * group;
    Stats3 st{0.0f, 0.0f, 0.0f};
    for (int64_t j = lane; j < group; j += kWarp) {
      const float v = xg[j];
      any_bad |= !isfinite(v);
      st.add(v);
    }
    warp_max(st);
    double sum = 0.0;
    if (op.needs_sum()) {
      if (lane == 0) sum = sum_abs_in_order(xg, group);
      sum = __shfl_sync(0xffffffffu, sum, 0);
    }
    float s;
    int32_t z;
    op.params(st.neg, st.pos, st.amax, sum, group, &s, &z);
    if (lane == 0) {
      scale_out[g] = s;
      if (zp_out) zp_out[g] = z;
    }
    for (int64_t j = lane; j < group; j += kWarp) {
      codes[g * group + j] = op.code(xg[j] * (1.0f / s), z, static_cast<uint64_t>(g * group + j));
    }
  }
  if (any_bad && bad) *bad = 1;
}

// Big groups, pass 1: each block reduces a chunk of one group and folds it into the group's
// statistics with atomicMax on their bit patterns.
__global__ void __launch_bounds__(kThreads)
big_stats_kernel(const float* __restrict__ x, int64_t ngroups, int64_t group,
                 int64_t chunks_per_group, int* stats, int* bad) {
  bool any_bad = false;
  for (int64_t t = blockIdx.x; t < ngroups * chunks_per_group; t += gridDim.x) {
    const int64_t g = t / chunks_per_group;
    const int64_t begin = (t - g * chunks_per_group) * kChunk;
    const int64_t end = begin + kChunk < group ? begin + kChunk : group;
    Stats3 st{0.0f, 0.0f, 0.0f};
    for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
      const float v = x[g * group + j];
      any_bad |= !isfinite(v);
      st.add(v);
    }
    block_max(st);
    if (threadIdx.x == 0) {
      atomicMax(stats + 3 * g + 0, __float_as_int(st.neg));
      atomicMax(stats + 3 * g + 1, __float_as_int(st.pos));
      atomicMax(stats + 3 * g + 2, __float_as_int(st.amax));
    }
  }
  if (any_bad && bad) *bad = 1;
}

// Big groups, pass 2: one thread per group turns the statistics into scale / zero point.
template <class Op>
__global__ void __launch_bounds__(kThreads)
big_params_kernel(const float* __restrict__ x, int64_t ngroups, int64_t group, const int* stats,
                  Op op, float* __restrict__ scale_out, int32_t* __restrict__ zp_out) {
  for (int64_t g = thread_id(); g < ngroups; g += grid_stride()) {
    const double sum = op.needs_sum() ? sum_abs_in_order(x + g * group, group) : 0.0;
    float s;
    int32_t z;
    op.params(__int_as_float(stats[3 * g]), __int_as_float(stats[3 * g + 1]),
              __int_as_float(stats[3 * g + 2]), sum, group, &s, &z);
    scale_out[g] = s;
    if (zp_out) zp_out[g] = z;
  }
}

template <class Op>
cudaError_t run_dynamic(const float* x, int64_t n, int64_t group, const Op& op, float* scale_out,
                        int32_t* zp_out, uint8_t* codes, int* bad, cudaStream_t stream) {
  cudaError_t err = begin(n, group, bad, stream);
  if (err != cudaSuccess || n == 0) return err;
  const int64_t ng = n / group;
  if (group <= kWarpGroupMax || !aligned(codes, 4)) {  // kThreads / kWarp groups per block
    return launch(dynamic_warp_kernel<Op>, ng * kWarp, stream, x, ng, group, op, scale_out,
                  zp_out, codes, bad);
  }
  // Large groups: the statistics (3 ints per group) live at the start of `codes` (> 1024 bytes
  // per group) until the last pass overwrites it; stream order keeps the passes apart.
  int* stats = reinterpret_cast<int*>(codes);
  const int64_t chunks = (group + kChunk - 1) / kChunk;
  if ((err = cudaMemsetAsync(stats, 0, sizeof(int) * 3 * ng, stream)) != cudaSuccess ||
      (err = launch(big_stats_kernel, ng * chunks * kThreads, stream, x, ng, group, chunks,
                    stats, bad)) != cudaSuccess ||
      (err = launch(big_params_kernel<Op>, ng, stream, x, ng, group,
                    static_cast<const int*>(stats), op, scale_out, zp_out)) != cudaSuccess) {
    return err;
  }
  return launch_static(x, n, group, scale_out, zp_out, op, codes, nullptr, stream);
}

}  // namespace

// ---- public launchers ------------------------------------------------------------------------------

cudaError_t quantize_affine(const float* x, int64_t n, int64_t group, const float* scale,
                            const int32_t* zp, const AffineSpec& spec, uint8_t* codes, int* bad,
                            cudaStream_t stream) {
  return launch_static(x, n, group, scale, zp, AffineOp{spec, kScaleAbsMax, 1.0f, 0}, codes, bad,
                       stream);
}

cudaError_t quantize_affine_dynamic(const float* x, int64_t n, int64_t group,
                                    const AffineSpec& spec, int rule, float qpos, int emax,
                                    float* scale_out, int32_t* zp_out, uint8_t* codes, int* bad,
                                    cudaStream_t stream) {
  if (rule == kScaleMinMax && zp_out == nullptr && n > 0) return cudaErrorInvalidValue;
  return run_dynamic(x, n, group, AffineOp{spec, rule, qpos, emax}, scale_out, zp_out, codes,
                     bad, stream);
}

cudaError_t dequantize_affine(const uint8_t* codes, int64_t n, int64_t group, const float* scale,
                              const int32_t* zp, bool is_signed, float offset, float* out,
                              cudaStream_t stream) {
  return launch_dequantize<false>(codes, n, group, scale, zp, is_signed, offset, nullptr, out,
                                  stream);
}

cudaError_t quantize_codebook(const float* x, int64_t n, int64_t group, const float* scale,
                              const CodebookSpec& spec, uint8_t* codes, int* bad,
                              cudaStream_t stream) {
  if (spec.n < 1 || spec.n > 256) return cudaErrorInvalidValue;
  return launch_static(x, n, group, scale, nullptr, CodebookOp{spec, kScaleAbsMax, 1.0f, 0},
                       codes, bad, stream);
}

cudaError_t quantize_codebook_dynamic(const float* x, int64_t n, int64_t group,
                                      const CodebookSpec& spec, int rule, float max_value,
                                      int emax, float* scale_out, uint8_t* codes, int* bad,
                                      cudaStream_t stream) {
  if (spec.n < 1 || spec.n > 256 || rule == kScaleMinMax) return cudaErrorInvalidValue;
  return run_dynamic(x, n, group, CodebookOp{spec, rule, max_value, emax}, scale_out, nullptr,
                     codes, bad, stream);
}

cudaError_t dequantize_lut(const uint8_t* codes, int64_t n, int64_t group, const float* scale,
                           const float* lut, float* out, cudaStream_t stream) {
  return launch_dequantize<true>(codes, n, group, scale, nullptr, false, 0.0f, lut, out, stream);
}

}  // namespace cuda
}  // namespace qk
