// Launch helpers shared by the CUDA translation units (internal to csrc/cuda).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace qk {
namespace cuda {
namespace detail {

constexpr int kThreads = 256;            // every kernel runs blocks of this size
constexpr int kWarp = 32;
constexpr int64_t kWarpGroupMax = 1024;  // larger groups: multi-block reduction, 3 passes
constexpr int64_t kChunk = 16384;        // elements per block in the multi-block reduction

inline bool aligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

// Blocks for `items` work items at one per thread, capped at a few waves (grid-stride loops).
inline unsigned grid_for(int64_t items) {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      sms <= 0) {
    sms = 128;
  }
  const int64_t want = (items + kThreads - 1) / kThreads, cap = int64_t{sms} * 32;
  return static_cast<unsigned>(want < 1 ? 1 : (want < cap ? want : cap));
}

template <class Kernel, class... Args>
cudaError_t launch(Kernel kernel, int64_t items, cudaStream_t stream, Args... args) {
  kernel<<<grid_for(items), kThreads, 0, stream>>>(args...);
  return cudaGetLastError();
}

// Validates the group layout and clears the NaN/Inf flag.
inline cudaError_t begin(int64_t n, int64_t group, int* bad, cudaStream_t stream) {
  if (n < 0 || group < 1 || n % group != 0) return cudaErrorInvalidValue;
  return bad ? cudaMemsetAsync(bad, 0, sizeof(int), stream) : cudaSuccess;
}

__device__ __forceinline__ int64_t thread_id() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

}  // namespace detail
}  // namespace cuda
}  // namespace qk
