// CUDA kernels of qkern (see kernels.cuh). Every value is computed by the QK_HD functions of
// csrc/core, compiled with --fmad=false and IEEE division, so codes and scales match the CPU
// bit for bit. The only order-dependent statistic, sum|x| in double (kScaleMeanAbs), is summed
// by one thread per group in element order; min/max reductions are order-free.
#include "cuda/kernels.cuh"

#include <cstdint>

#include "core/g711.h"

namespace qk {
namespace cuda {
namespace {

constexpr int kThreads = 256;               // every kernel runs blocks of this size
constexpr int kWarp = 32;
constexpr int64_t kWarpGroupMax = 1024;     // groups up to this size: one warp per group
constexpr int64_t kBigGroup = 65536;        // groups from this size: multi-block reduction
constexpr int64_t kChunk = 16384;           // elements per block in the multi-block reduction

bool aligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

// Enough blocks to cover `items` work items one per thread, capped at a few waves; the
// kernels loop grid-stride over the rest.
unsigned grid_for(int64_t items) {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      sms <= 0) {
    sms = 128;
  }
  const int64_t want = (items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * 32;
  return static_cast<unsigned>(want < 1 ? 1 : (want < cap ? want : cap));
}

// Validates the group layout and clears the NaN/Inf flag.
cudaError_t begin(int64_t n, int64_t group, int* bad, cudaStream_t stream) {
  if (n < 0 || group < 1 || n % group != 0) return cudaErrorInvalidValue;
  return bad ? cudaMemsetAsync(bad, 0, sizeof(int), stream) : cudaSuccess;
}

__device__ __forceinline__ int64_t thread_id() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// ---- per-format quantizers ---------------------------------------------------------------------
// bind(): called by every thread of the block before any other use (may stage tables in shared
// memory). params(): the group's scale/zero point from its statistics (lo = -neg, hi = pos, both
// already clipped at zero, which affine_params_from_stats does anyway). code(): one element.

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
  CodebookSpec spec;  // values/codes: device memory until bind() points them at shared memory
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
    const AffineSpec unused{0, 0, spec.rounding, kMidTread, 0.0f, spec.seed};
    affine_params_from_stats(-neg, pos, amax, sum_abs, group, rule, max_value, emax, unused,
                             scale, zp);
    *zp = 0;
  }
  __device__ uint8_t code(float t, int32_t /*zp*/, uint64_t index) const {
    return codebook_code(t, spec, index);
  }
};

// ---- quantization with known scales (also the last pass of the big-group dynamic path) -----------

// Each thread handles runs of 4 consecutive elements (float4 / uchar4 when kVec).
template <class Op, bool kVec>
__global__ void __launch_bounds__(kThreads)
quantize_static_kernel(const float* __restrict__ x, int64_t n, int64_t group,
                       const float* __restrict__ scale, const int32_t* __restrict__ zp, Op op,
                       uint8_t* __restrict__ codes, int* bad) {
  Op o = op;
  o.bind();
  bool any_bad = false;
  const int64_t nv = (n + 3) / 4;
  for (int64_t v = thread_id(); v < nv; v += grid_stride()) {
    const int64_t i0 = v * 4;
    const int cnt = n - i0 < 4 ? static_cast<int>(n - i0) : 4;
    float xs[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (kVec && cnt == 4) {
      const float4 f = reinterpret_cast<const float4*>(x)[v];
      xs[0] = f.x; xs[1] = f.y; xs[2] = f.z; xs[3] = f.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) if (j < cnt) xs[j] = x[i0 + j];
    }
    int64_t g = i0 / group;
    int64_t r = i0 - g * group;
    uint8_t out[4] = {0, 0, 0, 0};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < cnt) {
        any_bad |= !isfinite(xs[j]);
        const int32_t z = zp ? zp[g] : 0;
        out[j] = o.code(xs[j] / scale[g], z, static_cast<uint64_t>(i0 + j));
        if (++r == group) { r = 0; ++g; }
      }
    }
    if (kVec && cnt == 4) {
      reinterpret_cast<uchar4*>(codes)[v] = make_uchar4(out[0], out[1], out[2], out[3]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) if (j < cnt) codes[i0 + j] = out[j];
    }
  }
  if (any_bad && bad) *bad = 1;
}

template <class Op>
void launch_static(const float* x, int64_t n, int64_t group, const float* scale,
                   const int32_t* zp, const Op& op, uint8_t* codes, int* bad,
                   cudaStream_t stream) {
  const unsigned blocks = grid_for((n + 3) / 4);
  if (aligned(x, 16) && aligned(codes, 4)) {
    quantize_static_kernel<Op, true><<<blocks, kThreads, 0, stream>>>(x, n, group, scale, zp, op,
                                                                      codes, bad);
  } else {
    quantize_static_kernel<Op, false><<<blocks, kThreads, 0, stream>>>(x, n, group, scale, zp,
                                                                       op, codes, bad);
  }
}

// ---- dynamic scales ----------------------------------------------------------------------------

// Group statistics, all >= 0 so that float order equals int order (for atomicMax):
// neg = max(-x, 0), pos = max(x, 0), amax = max|x|. fmaxf skips NaN; NaN/Inf raise the flag.
struct Stats3 {
  float neg, pos, amax;
  __device__ void add(float v) {
    neg = fmaxf(neg, -v);
    pos = fmaxf(pos, v);
    amax = fmaxf(amax, fabsf(v));
  }
};

__device__ __forceinline__ void warp_max(Stats3& s) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    s.neg = fmaxf(s.neg, __shfl_xor_sync(0xffffffffu, s.neg, o));
    s.pos = fmaxf(s.pos, __shfl_xor_sync(0xffffffffu, s.pos, o));
    s.amax = fmaxf(s.amax, __shfl_xor_sync(0xffffffffu, s.amax, o));
  }
}

// Team of kTeam threads (a warp, or the whole block when kTeam == kThreads): every thread gets
// the team's maximum. Block teams must call it with all threads (it synchronizes).
template <int kTeam>
__device__ __forceinline__ void team_max(Stats3& s) {
  warp_max(s);
  if (kTeam == kWarp) return;
  __shared__ Stats3 parts[kThreads / kWarp];
  const int w = threadIdx.x / kWarp;
  __syncthreads();  // earlier readers of parts are done
  if (threadIdx.x % kWarp == 0) parts[w] = s;
  __syncthreads();
  s = parts[0];
  for (int i = 1; i < kThreads / kWarp; ++i) {
    s.neg = fmaxf(s.neg, parts[i].neg);
    s.pos = fmaxf(s.pos, parts[i].pos);
    s.amax = fmaxf(s.amax, parts[i].amax);
  }
}

// sum |x| of one group in double, element by element (the CPU's order).
__device__ double sum_abs_in_order(const float* __restrict__ xg, int64_t group) {
  double sum = 0.0;
#pragma unroll 8
  for (int64_t j = 0; j < group; ++j) sum += static_cast<double>(fabsf(xg[j]));
  return sum;
}

// One team per group: reduce, compute the group's parameters, quantize the group.
template <class Op, int kTeam>
__global__ void __launch_bounds__(kThreads)
dynamic_fused_kernel(const float* __restrict__ x, int64_t ngroups, int64_t group, Op op,
                     float* __restrict__ scale_out, int32_t* __restrict__ zp_out,
                     uint8_t* __restrict__ codes, int* bad) {
  Op o = op;
  o.bind();
  const int lane = threadIdx.x % kTeam;
  const int teams = kThreads / kTeam;
  bool any_bad = false;
  __shared__ double s_sum;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * teams + threadIdx.x / kTeam; g < ngroups;
       g += static_cast<int64_t>(gridDim.x) * teams) {
    const float* xg = x + g * group;
    Stats3 st{0.0f, 0.0f, 0.0f};
    for (int64_t j = lane; j < group; j += kTeam) {
      const float v = xg[j];
      any_bad |= !isfinite(v);
      st.add(v);
    }
    team_max<kTeam>(st);
    double sum = 0.0;
    if (o.needs_sum()) {
      if (lane == 0) sum = sum_abs_in_order(xg, group);
      if (kTeam == kWarp) {
        sum = __shfl_sync(0xffffffffu, sum, 0);
      } else {
        if (lane == 0) s_sum = sum;
        __syncthreads();
        sum = s_sum;
        __syncthreads();
      }
    }
    float s;
    int32_t z;
    o.params(st.neg, st.pos, st.amax, sum, group, &s, &z);
    if (lane == 0) {
      scale_out[g] = s;
      if (zp_out) zp_out[g] = z;
    }
    for (int64_t j = lane; j < group; j += kTeam) {
      const int64_t i = g * group + j;
      codes[i] = o.code(xg[j] / s, z, static_cast<uint64_t>(i));
    }
  }
  if (any_bad && bad) *bad = 1;
}

// Big groups, pass 1: each block reduces a chunk of one group and folds it into the group's
// three statistics with atomicMax on their bit patterns (non-negative floats).
__global__ void __launch_bounds__(kThreads)
big_stats_kernel(const float* __restrict__ x, int64_t ngroups, int64_t group,
                 int64_t chunks_per_group, int* stats, int* bad) {
  bool any_bad = false;
  const int64_t tasks = ngroups * chunks_per_group;
  for (int64_t t = blockIdx.x; t < tasks; t += gridDim.x) {
    const int64_t g = t / chunks_per_group;
    const int64_t begin = (t - g * chunks_per_group) * kChunk;
    const int64_t end = begin + kChunk < group ? begin + kChunk : group;
    const float* xg = x + g * group;
    Stats3 st{0.0f, 0.0f, 0.0f};
    for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
      const float v = xg[j];
      any_bad |= !isfinite(v);
      st.add(v);
    }
    team_max<kThreads>(st);
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
big_params_kernel(const float* __restrict__ x, int64_t ngroups, int64_t group,
                  const int* stats, Op op, float* __restrict__ scale_out,
                  int32_t* __restrict__ zp_out) {
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
  const int64_t ngroups = n / group;
  if (group <= kWarpGroupMax) {
    const int64_t teams = kThreads / kWarp;
    dynamic_fused_kernel<Op, kWarp><<<grid_for(ngroups * kThreads / teams), kThreads, 0,
                                      stream>>>(x, ngroups, group, op, scale_out, zp_out, codes,
                                                bad);
  } else if (group < kBigGroup || !aligned(codes, 4)) {
    dynamic_fused_kernel<Op, kThreads><<<grid_for(ngroups * kThreads), kThreads, 0, stream>>>(
        x, ngroups, group, op, scale_out, zp_out, codes, bad);
  } else {
    // The statistics (3 ints per group) live at the start of `codes` (n >= 65536 * ngroups
    // bytes) until the last pass overwrites it; stream order keeps the passes apart.
    int* stats = reinterpret_cast<int*>(codes);
    err = cudaMemsetAsync(stats, 0, static_cast<size_t>(ngroups) * 3 * sizeof(int), stream);
    if (err != cudaSuccess) return err;
    const int64_t chunks = (group + kChunk - 1) / kChunk;
    big_stats_kernel<<<grid_for(ngroups * chunks * kThreads), kThreads, 0, stream>>>(
        x, ngroups, group, chunks, stats, bad);
    big_params_kernel<Op><<<grid_for(ngroups), kThreads, 0, stream>>>(x, ngroups, group, stats,
                                                                      op, scale_out, zp_out);
    launch_static(x, n, group, scale_out, zp_out, op, codes, nullptr, stream);
  }
  return cudaGetLastError();
}

// ---- dequantization -------------------------------------------------------------------------------

template <bool kVec, bool kLut>
__global__ void __launch_bounds__(kThreads)
dequantize_kernel(const uint8_t* __restrict__ codes, int64_t n, int64_t group,
                  const float* __restrict__ scale, const int32_t* __restrict__ zp,
                  bool is_signed, float offset, const float* __restrict__ lut,
                  float* __restrict__ out) {
  __shared__ float s_lut[256];
  if (kLut) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_lut[i] = lut[i];
    __syncthreads();
  }
  const int64_t nv = (n + 3) / 4;
  for (int64_t v = thread_id(); v < nv; v += grid_stride()) {
    const int64_t i0 = v * 4;
    const int cnt = n - i0 < 4 ? static_cast<int>(n - i0) : 4;
    uint8_t cs[4] = {0, 0, 0, 0};
    if (kVec && cnt == 4) {
      const uchar4 c = reinterpret_cast<const uchar4*>(codes)[v];
      cs[0] = c.x; cs[1] = c.y; cs[2] = c.z; cs[3] = c.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) if (j < cnt) cs[j] = codes[i0 + j];
    }
    int64_t g = i0 / group;
    int64_t r = i0 - g * group;
    float ys[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < cnt) {
        if (kLut) {
          ys[j] = s_lut[cs[j]] * scale[g];
        } else {
          const int32_t q = is_signed ? static_cast<int32_t>(static_cast<int8_t>(cs[j]))
                                      : static_cast<int32_t>(cs[j]);
          ys[j] = affine_value(q, zp ? zp[g] : 0, offset, scale[g]);
        }
        if (++r == group) { r = 0; ++g; }
      }
    }
    if (kVec && cnt == 4) {
      reinterpret_cast<float4*>(out)[v] = make_float4(ys[0], ys[1], ys[2], ys[3]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) if (j < cnt) out[i0 + j] = ys[j];
    }
  }
}

template <bool kLut>
cudaError_t launch_dequantize(const uint8_t* codes, int64_t n, int64_t group,
                              const float* scale, const int32_t* zp, bool is_signed,
                              float offset, const float* lut, float* out, cudaStream_t stream) {
  cudaError_t err = begin(n, group, nullptr, stream);
  if (err != cudaSuccess || n == 0) return err;
  const unsigned blocks = grid_for((n + 3) / 4);
  if (aligned(codes, 4) && aligned(out, 16)) {
    dequantize_kernel<true, kLut><<<blocks, kThreads, 0, stream>>>(codes, n, group, scale, zp,
                                                                   is_signed, offset, lut, out);
  } else {
    dequantize_kernel<false, kLut><<<blocks, kThreads, 0, stream>>>(codes, n, group, scale, zp,
                                                                    is_signed, offset, lut, out);
  }
  return cudaGetLastError();
}

// ---- bit packing -------------------------------------------------------------------------------------

// One thread per output byte: stream bits [8b, 8b + 8).
__global__ void __launch_bounds__(kThreads)
pack_kernel(const uint8_t* __restrict__ codes, int64_t n, int bits, bool msb,
            uint8_t* __restrict__ out, int64_t nbytes) {
  const int64_t total = n * bits;
  for (int64_t b = thread_id(); b < nbytes; b += grid_stride()) {
    int64_t k = b * 8;
    int64_t i = k / bits;
    int j = static_cast<int>(k - i * bits);  // bit of element i, in stream order
    unsigned c = codes[i];                   // i < n: byte b holds at least one stream bit
    unsigned byte = 0;
    for (int p = 0; p < 8 && k < total; ++p, ++k) {
      const unsigned bit = (c >> (msb ? bits - 1 - j : j)) & 1u;
      byte |= bit << (msb ? 7 - p : p);
      if (++j == bits) {
        j = 0;
        ++i;
        c = i < n ? codes[i] : 0u;
      }
    }
    out[b] = static_cast<uint8_t>(byte);
  }
}

// One thread per element.
__global__ void __launch_bounds__(kThreads)
unpack_kernel(const uint8_t* __restrict__ packed, int64_t n, int bits, bool msb,
              uint8_t* __restrict__ out) {
  for (int64_t i = thread_id(); i < n; i += grid_stride()) {
    const int64_t k0 = i * bits;
    unsigned v = 0;
    for (int j = 0; j < bits; ++j) {
      const int64_t k = k0 + j;
      const unsigned byte = packed[k >> 3];
      const int pos = static_cast<int>(k & 7);
      const unsigned bit = (byte >> (msb ? 7 - pos : pos)) & 1u;
      v |= bit << (msb ? bits - 1 - j : j);
    }
    out[i] = static_cast<uint8_t>(v);
  }
}

// ---- G.711 ---------------------------------------------------------------------------------------------

enum G711Op : int { kMulawEnc, kMulawDec, kAlawEnc, kAlawDec };

template <int kOp, class In, class Out>
__global__ void __launch_bounds__(kThreads)
g711_kernel(const In* __restrict__ in, int64_t n, Out* __restrict__ out) {
  for (int64_t i = thread_id(); i < n; i += grid_stride()) {
    if (kOp == kMulawEnc) out[i] = static_cast<Out>(mulaw_encode1(static_cast<int16_t>(in[i])));
    if (kOp == kMulawDec) out[i] = static_cast<Out>(mulaw_decode1(static_cast<uint8_t>(in[i])));
    if (kOp == kAlawEnc) out[i] = static_cast<Out>(alaw_encode1(static_cast<int16_t>(in[i])));
    if (kOp == kAlawDec) out[i] = static_cast<Out>(alaw_decode1(static_cast<uint8_t>(in[i])));
  }
}

template <int kOp, class In, class Out>
cudaError_t launch_g711(const In* in, int64_t n, Out* out, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  g711_kernel<kOp, In, Out><<<grid_for(n), kThreads, 0, stream>>>(in, n, out);
  return cudaGetLastError();
}

}  // namespace

// ---- public launchers ------------------------------------------------------------------------------

cudaError_t quantize_affine(const float* x, int64_t n, int64_t group, const float* scale,
                            const int32_t* zp, const AffineSpec& spec, uint8_t* codes, int* bad,
                            cudaStream_t stream) {
  cudaError_t err = begin(n, group, bad, stream);
  if (err != cudaSuccess || n == 0) return err;
  launch_static(x, n, group, scale, zp, AffineOp{spec, kScaleAbsMax, 1.0f, 0}, codes, bad,
                stream);
  return cudaGetLastError();
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
  cudaError_t err = begin(n, group, bad, stream);
  if (err != cudaSuccess || n == 0) return err;
  launch_static(x, n, group, scale, nullptr, CodebookOp{spec, kScaleAbsMax, 1.0f, 0}, codes, bad,
                stream);
  return cudaGetLastError();
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

int64_t packed_nbytes(int64_t n, int bits) { return (n * bits + 7) / 8; }

cudaError_t pack_bits(const uint8_t* codes, int64_t n, int bits, bool msb, uint8_t* out,
                      cudaStream_t stream) {
  if (n < 0 || bits < 1 || bits > 8) return cudaErrorInvalidValue;
  const int64_t nbytes = packed_nbytes(n, bits);
  if (nbytes == 0) return cudaSuccess;
  pack_kernel<<<grid_for(nbytes), kThreads, 0, stream>>>(codes, n, bits, msb, out, nbytes);
  return cudaGetLastError();
}

cudaError_t unpack_bits(const uint8_t* packed, int64_t n, int bits, bool msb, uint8_t* out,
                        cudaStream_t stream) {
  if (n < 0 || bits < 1 || bits > 8) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  unpack_kernel<<<grid_for(n), kThreads, 0, stream>>>(packed, n, bits, msb, out);
  return cudaGetLastError();
}

cudaError_t mulaw_encode(const int16_t* pcm, int64_t n, uint8_t* out, cudaStream_t stream) {
  return launch_g711<kMulawEnc>(pcm, n, out, stream);
}
cudaError_t mulaw_decode(const uint8_t* codes, int64_t n, int16_t* out, cudaStream_t stream) {
  return launch_g711<kMulawDec>(codes, n, out, stream);
}
cudaError_t alaw_encode(const int16_t* pcm, int64_t n, uint8_t* out, cudaStream_t stream) {
  return launch_g711<kAlawEnc>(pcm, n, out, stream);
}
cudaError_t alaw_decode(const uint8_t* codes, int64_t n, int16_t* out, cudaStream_t stream) {
  return launch_g711<kAlawDec>(codes, n, out, stream);
}

}  // namespace cuda
}  // namespace qk
