// CUDA quantized matmuls over the CPU ops' packed layouts, unchanged (docs/numerics.md; the
// layouts are defined in csrc/cpu/gemm/{w4,lut4,w8}/api.h):
//   gemm_w4    int4 group-wise weights, exact (float) and fast (int8 activations) modes
//   gemm_lut4  4-bit codes of a 16-entry table (nf4, fp4) with float32 group scales
//   gemm_w8a8  int8 per-channel weights x int8 per-row dynamic activations, int32 sums
//   gemm_w8a16 int8 per-channel weights x float activations
// y (m, n) float32 = x (m, k) @ W^T (+ bias). What each guarantees relative to the CPU op is in
// docs/numerics.md "CUDA matmuls": gemm_w4 (both modes) and gemm_w8a8 give the CPU's bits.
//
// Conventions (as kernels.cuh): device pointers on the current device, asynchronous launches
// on `stream`, the launch error returned (cudaErrorInvalidValue for bad shapes: the *_check
// functions say why; cudaErrorMisalignedAddress when a vector-loaded buffer is not 16-byte
// aligned). Workspaces are the caller's (torch's allocator):
//   gemm_w4 mode 1: xq m*k bytes, dx and xs m*(k/32) floats each, bad one int (unused in
//   mode 0: may be null);
//   gemm_w8a8: xq m*kp bytes (kp = k rounded up to 4), sx m floats, bad one int.
// `bad` is cleared, then set to 1 when x holds NaN or Inf (int8 codes cannot represent them;
// y is then unspecified): read it after the stream has run.
// `path`: 0 chooses (GEMV kernels for m <= 8, else GEMM), 1 forces the GEMV kernels (rows in
// chunks of 8), 2 the GEMM kernels. Alignment: x, packed, scales (gemm_w4) and the workspaces
// 16 bytes.
//
// emulate_*: the same launch sequence run on the host over host pointers, every kernel step
// thread by thread (gemm_body.cuh): for tests without a GPU. `reverse` runs the threads of each
// step in reverse order. Throws std::invalid_argument for bad shapes and std::runtime_error
// when a kernel would access memory outside its buffers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace qk {
namespace cuda {

// nullptr when the shapes are valid, else what is wrong.
const char* gemm_w4_check(int64_t m, int64_t n, int64_t k, int64_t group, int mode, int path);
const char* gemm_lut4_check(int64_t m, int64_t n, int64_t k, int64_t group, int path);
const char* gemm_w8_check(int64_t m, int64_t n, int64_t k, bool a8, int path);

cudaError_t gemm_w4(const float* x, int64_t m, const uint8_t* packed, const float* scales,
                    const int32_t* zeros, const float* bias, int64_t n, int64_t k, int64_t group,
                    int mode, int8_t* xq, float* dx, float* xs, int* bad, float* y, int path,
                    cudaStream_t stream);
cudaError_t gemm_lut4(const float* x, int64_t m, const uint8_t* packed, const float* scales,
                      const float* table16, const float* bias, int64_t n, int64_t k,
                      int64_t group, float* y, int path, cudaStream_t stream);
cudaError_t gemm_w8a8(const float* x, int64_t m, const int8_t* packed, const float* w_scale,
                      const float* bias, int64_t n, int64_t k, int8_t* xq, float* sx, int* bad,
                      float* y, int path, cudaStream_t stream);
cudaError_t gemm_w8a16(const float* x, int64_t m, const int8_t* packed, const float* w_scale,
                       const float* bias, int64_t n, int64_t k, float* y, int path,
                       cudaStream_t stream);

void emulate_gemm_w4(const float* x, int64_t m, const uint8_t* packed, const float* scales,
                     const int32_t* zeros, const float* bias, int64_t n, int64_t k, int64_t group,
                     int mode, int8_t* xq, float* dx, float* xs, int* bad, float* y, int path,
                     bool reverse);
void emulate_gemm_lut4(const float* x, int64_t m, const uint8_t* packed, const float* scales,
                       const float* table16, const float* bias, int64_t n, int64_t k,
                       int64_t group, float* y, int path, bool reverse);
void emulate_gemm_w8a8(const float* x, int64_t m, const int8_t* packed, const float* w_scale,
                       const float* bias, int64_t n, int64_t k, int8_t* xq, float* sx, int* bad,
                       float* y, int path, bool reverse);
void emulate_gemm_w8a16(const float* x, int64_t m, const int8_t* packed, const float* w_scale,
                        const float* bias, int64_t n, int64_t k, float* y, int path,
                        bool reverse);

}  // namespace cuda
}  // namespace qk
