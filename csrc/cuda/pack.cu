// CUDA bit packing (dense streams, docs/numerics.md) and G.711, over the csrc/core rules.
#include <cstdint>

#include "core/g711.h"
#include "cuda/kernels.cuh"
#include "cuda/launch.cuh"

namespace qk {
namespace cuda {
namespace {

using namespace detail;  // NOLINT: launch helpers

// ---- bit packing and G.711 ---------------------------------------------------------------------

// One thread per output byte: stream bits [8b, 8b + 8).
__global__ void __launch_bounds__(kThreads)
pack_kernel(const uint8_t* __restrict__ codes, int64_t n, int bits, bool msb,
            uint8_t* __restrict__ out, int64_t nbytes) {
  for (int64_t b = thread_id(); b < nbytes; b += grid_stride()) {
    int64_t k = b * 8, i = k / bits;
    int j = static_cast<int>(k - i * bits);  // bit of element i, in stream order
    unsigned c = codes[i], byte = 0;         // i < n: byte b holds at least one stream bit
    for (int p = 0; p < 8 && k < n * bits; ++p, ++k) {
      byte |= ((c >> (msb ? bits - 1 - j : j)) & 1u) << (msb ? 7 - p : p);
      if (++j == bits) {
        j = 0;
        c = ++i < n ? codes[i] : 0u;
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
    unsigned v = 0;
    for (int j = 0; j < bits; ++j) {
      const int64_t k = i * bits + j;
      const int pos = static_cast<int>(k & 7);
      v |= ((packed[k >> 3] >> (msb ? 7 - pos : pos)) & 1u) << (msb ? bits - 1 - j : j);
    }
    out[i] = static_cast<uint8_t>(v);
  }
}

enum G711Op : int { kMulawEnc, kMulawDec, kAlawEnc, kAlawDec };

__global__ void __launch_bounds__(kThreads)
g711_kernel(const void* __restrict__ in, int64_t n, void* __restrict__ out, int op) {
  const auto* pcm = static_cast<const int16_t*>(in);
  const auto* code = static_cast<const uint8_t*>(in);
  for (int64_t i = thread_id(); i < n; i += grid_stride()) {
    switch (op) {
      case kMulawEnc: static_cast<uint8_t*>(out)[i] = mulaw_encode1(pcm[i]); break;
      case kMulawDec: static_cast<int16_t*>(out)[i] = mulaw_decode1(code[i]); break;
      case kAlawEnc: static_cast<uint8_t*>(out)[i] = alaw_encode1(pcm[i]); break;
      default: static_cast<int16_t*>(out)[i] = alaw_decode1(code[i]); break;
    }
  }
}

cudaError_t run_g711(const void* in, int64_t n, void* out, int op, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  return n == 0 ? cudaSuccess : launch(g711_kernel, n, stream, in, n, out, op);
}

}  // namespace

int64_t packed_nbytes(int64_t n, int bits) { return (n * bits + 7) / 8; }

cudaError_t pack_bits(const uint8_t* codes, int64_t n, int bits, bool msb, uint8_t* out,
                      cudaStream_t stream) {
  if (n < 0 || bits < 1 || bits > 8) return cudaErrorInvalidValue;
  const int64_t nbytes = packed_nbytes(n, bits);
  return nbytes == 0 ? cudaSuccess
                     : launch(pack_kernel, nbytes, stream, codes, n, bits, msb, out, nbytes);
}

cudaError_t unpack_bits(const uint8_t* packed, int64_t n, int bits, bool msb, uint8_t* out,
                        cudaStream_t stream) {
  if (n < 0 || bits < 1 || bits > 8) return cudaErrorInvalidValue;
  return n == 0 ? cudaSuccess : launch(unpack_kernel, n, stream, packed, n, bits, msb, out);
}

cudaError_t mulaw_encode(const int16_t* pcm, int64_t n, uint8_t* out, cudaStream_t stream) {
  return run_g711(pcm, n, out, kMulawEnc, stream);
}
cudaError_t mulaw_decode(const uint8_t* codes, int64_t n, int16_t* out, cudaStream_t stream) {
  return run_g711(codes, n, out, kMulawDec, stream);
}
cudaError_t alaw_encode(const int16_t* pcm, int64_t n, uint8_t* out, cudaStream_t stream) {
  return run_g711(pcm, n, out, kAlawEnc, stream);
}
cudaError_t alaw_decode(const uint8_t* codes, int64_t n, int16_t* out, cudaStream_t stream) {
  return run_g711(codes, n, out, kAlawDec, stream);
}

}  // namespace cuda
}  // namespace qk
