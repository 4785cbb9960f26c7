// Internal interface of the signal coders (api.h): the per-ISA table and the scalar
// per-sample rules the SIMD path falls back to.
#pragma once
#include <cstdint>

#include "cpu/runtime/isa.h"
#include "cpu/signal/api.h"

namespace qk {
namespace signal {

// One DPCM job: encode (x != nullptr: x -> codes, xh) or decode (codes -> xh).
struct DpcmJob {
  DpcmArgs a;
  const float* x;
  uint8_t* codes;
  float* xh;
};

struct Kernels {
  // channels [c0, c1) of the job, all time steps.
  void (*dpcm)(const DpcmJob& j, int64_t c0, int64_t c1);
};

extern const Kernels kScalarKernels;  // scalar.cpp
const Kernels* avx2_kernels();        // avx2.cpp

inline const Kernels& kernels() {
  const Kernels* const by_isa[] = {&kScalarKernels, avx2_kernels()};
  return pick(by_isa);
}

// The reference DPCM of channels [c0, c1) (scalar.cpp); the AVX2 path uses it for the channels
// that do not fill a vector and for the mu-law quantizer.
void dpcm_scalar(const DpcmJob& j, int64_t c0, int64_t c1);

// The serial IMA-ADPCM coders of one row (scalar on every ISA: each sample depends on the last).
void adpcm_encode_row(const int16_t* pcm, int64_t n, uint8_t* codes, int32_t* state);
void adpcm_decode_row(const uint8_t* codes, int64_t n, int16_t* pcm, int32_t* state);

}  // namespace signal
}  // namespace qk
