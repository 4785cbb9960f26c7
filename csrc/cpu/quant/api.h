// Public C++ API of the elementwise CPU kernels: quantize / dequantize, statistics, bit
// packing, G.711 (no torch, no Python; the ISA switch and the thread count are in
// cpu/runtime/). Arrays are contiguous; a tensor of n elements is split into n / group
// consecutive groups, group g using scale[g] (and zp[g]). Codes are one byte per element (two's complement for signed formats).
// Functions returning bool return true when a NaN or Inf was seen in the input.
#pragma once
#include <cstdint>
#include "core/affine.h"
#include "core/codebook.h"

namespace qk {

// ---- uniform (affine) --------------------------------------------------------------------
bool quantize_affine(const float* x, int64_t n, int64_t group, const float* scale,
                     const int32_t* zp, const AffineSpec& spec, uint8_t* codes);

// Computes scale (and zp when rule == kScaleMinMax; zp_out may be null otherwise) per group
// from the data, then quantizes. qpos: the divisor of amax for kScaleAbsMax; emax: for MX.
bool quantize_affine_dynamic(const float* x, int64_t n, int64_t group, const AffineSpec& spec,
                             int rule, float qpos, int emax, float* scale_out, int32_t* zp_out,
                             uint8_t* codes);

// out = (float(code - zp) + offset) * scale; codes are int8 when is_signed.
void dequantize_affine(const uint8_t* codes, int64_t n, int64_t group, const float* scale,
                       const int32_t* zp, bool is_signed, float offset, float* out);

// ---- codebook / lookup table -------------------------------------------------------------
bool quantize_codebook(const float* x, int64_t n, int64_t group, const float* scale,
                       const CodebookSpec& spec, uint8_t* codes);

// rule: kScaleAbsMax (amax / max_value), kScalePow2MX (emax) or kScaleMeanAbs.
bool quantize_codebook_dynamic(const float* x, int64_t n, int64_t group,
                               const CodebookSpec& spec, int rule, float max_value, int emax,
                               float* scale_out, uint8_t* codes);

// out = lut[code] * scale (lut has 256 entries).
void dequantize_lut(const uint8_t* codes, int64_t n, int64_t group, const float* scale,
                    const float* lut, float* out);

// ---- statistics ----------------------------------------------------------------------------
struct Stats {
  float lo, hi, amax;
  double sum_abs;  // only filled when asked (order-dependent; always computed in order)
  bool bad;        // NaN or Inf seen
};
void group_stats(const float* x, int64_t n, int64_t group, bool want_sum_abs, Stats* out);

// ---- bit packing ---------------------------------------------------------------------------
int64_t packed_nbytes(int64_t n, int bits);
void pack_bits(const uint8_t* codes, int64_t n, int bits, bool msb, uint8_t* out);
void unpack_bits(const uint8_t* packed, int64_t n, int bits, bool msb, uint8_t* out);

// ---- G.711 -----------------------------------------------------------------------------------
void mulaw_encode(const int16_t* pcm, int64_t n, uint8_t* out);
void mulaw_decode(const uint8_t* codes, int64_t n, int16_t* out);
void alaw_encode(const int16_t* pcm, int64_t n, uint8_t* out);
void alaw_decode(const uint8_t* codes, int64_t n, int16_t* out);

}  // namespace qk
