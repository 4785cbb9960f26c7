// CUDA kernels of qkern: one launcher per entry point of csrc/cpu/quant/api.h, bit-identical
// to the CPU because every numeric step goes through the QK_HD functions of csrc/core.
//
// Conventions:
// - every pointer is a device pointer on the current device; launches are asynchronous on
//   `stream` and the launchers return the launch error (cudaSuccess when fine);
// - `bad` (a device int, may be null) is cleared by the launcher and set to 1 by the kernels
//   when the float input holds a NaN or Inf; read it after the stream has finished;
// - the codebook tables (CodebookSpec::values / ::codes, at most 256 entries) are device
//   pointers; the kernels stage them in shared memory;
// - n elements in n / group groups; group >= 1 and n % group == 0 (else cudaErrorInvalidValue).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "core/affine.h"
#include "core/codebook.h"

namespace qk {
namespace cuda {

// ---- uniform (affine) ------------------------------------------------------------------------
cudaError_t quantize_affine(const float* x, int64_t n, int64_t group, const float* scale,
                            const int32_t* zp, const AffineSpec& spec, uint8_t* codes, int* bad,
                            cudaStream_t stream);

// Per-group scale (and zero point) from the data, then quantization. zp_out may be null unless
// rule == kScaleMinMax; it receives 0 for the symmetric rules. sum|x| (kScaleMeanAbs) is summed
// in double, in element order, exactly like the CPU.
cudaError_t quantize_affine_dynamic(const float* x, int64_t n, int64_t group,
                                    const AffineSpec& spec, int rule, float qpos, int emax,
                                    float* scale_out, int32_t* zp_out, uint8_t* codes, int* bad,
                                    cudaStream_t stream);

// out = (float(code - zp) + offset) * scale; codes are int8 when is_signed; zp may be null.
cudaError_t dequantize_affine(const uint8_t* codes, int64_t n, int64_t group, const float* scale,
                              const int32_t* zp, bool is_signed, float offset, float* out,
                              cudaStream_t stream);

// ---- codebook / lookup table -------------------------------------------------------------------
cudaError_t quantize_codebook(const float* x, int64_t n, int64_t group, const float* scale,
                              const CodebookSpec& spec, uint8_t* codes, int* bad,
                              cudaStream_t stream);

// rule: kScaleAbsMax (amax / max_value), kScalePow2MX (emax) or kScaleMeanAbs.
cudaError_t quantize_codebook_dynamic(const float* x, int64_t n, int64_t group,
                                      const CodebookSpec& spec, int rule, float max_value,
                                      int emax, float* scale_out, uint8_t* codes, int* bad,
                                      cudaStream_t stream);

// out = lut[code] * scale (lut: 256 floats in device memory).
cudaError_t dequantize_lut(const uint8_t* codes, int64_t n, int64_t group, const float* scale,
                           const float* lut, float* out, cudaStream_t stream);

// ---- bit packing (dense bit stream, docs/numerics.md) --------------------------------------------
int64_t packed_nbytes(int64_t n, int bits);
cudaError_t pack_bits(const uint8_t* codes, int64_t n, int bits, bool msb, uint8_t* out,
                      cudaStream_t stream);
// Writes the low `bits` bits of each code (no sign extension).
cudaError_t unpack_bits(const uint8_t* packed, int64_t n, int bits, bool msb, uint8_t* out,
                        cudaStream_t stream);

// ---- G.711 -----------------------------------------------------------------------------------------
cudaError_t mulaw_encode(const int16_t* pcm, int64_t n, uint8_t* out, cudaStream_t stream);
cudaError_t mulaw_decode(const uint8_t* codes, int64_t n, int16_t* out, cudaStream_t stream);
cudaError_t alaw_encode(const int16_t* pcm, int64_t n, uint8_t* out, cudaStream_t stream);
cudaError_t alaw_decode(const uint8_t* codes, int64_t n, int16_t* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace qk
