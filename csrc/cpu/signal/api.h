// Predictive / differential coding of signals (python/qkern/signal.py, docs/signal.md).
// Torch-free.
//
// IMA-ADPCM (Interactive Multimedia Association, 1992; the coder of Python's audioop
// lin2adpcm / adpcm2lin): 4-bit codes for 16-bit PCM, the standard 89-entry step table and
// 16-entry index table. The state of a stream is (valprev, index): the decoder's last
// reconstruction (int16 range) and the step-table position (0..88); a stream split over calls
// gives the same codes as one call when each call starts from the previous one's state.
//
// DPCM (closed loop): for channel c of a (T, C) row-major float32 signal x, with predictor
// coefficients a_1..a_p (p = order, 1..4) and reconstructions xh (xh[t] = 0 for t < 0):
//   pred = 0; for k = 1..p: pred = pred + a_k * xh[t - k]        (float32, in this order)
//   r = x[t] - pred; quantize r to a code and a value v; xh[t] = pred + v.
// The encoder predicts from the decoder's reconstructions, so quantization errors do not
// accumulate. Residual quantizers (step s > 0 per channel):
//   kUniform, bits >= 2: q = clamp(rint(r / s), -2^(bits-1), 2^(bits-1) - 1) (rint: nearest,
//     ties to even), code = q + 2^(bits-1), v = q * s.
//   kUniform, bits == 1 (delta modulation): code = (r >= 0), v = code ? s : -s.
//   kMuLaw, bits >= 2 (s is the range R, M = 2^(bits-1) - 1, in double):
//     y = log1p(mu * min(|r| / R, 1)) / log1p(mu), m = rint(y * M), q = sign(r) * m,
//     code = q + 2^(bits-1), v = float(sign(q) * R * expm1(m / M * log1p(mu)) / mu).
// Delta quantization is DPCM with p = 1, a_1 = 1.
#pragma once
#include <cstdint>

namespace qk {

// IMA-ADPCM over `channels` independent rows of n samples (row-major); state: int32
// (channels, 2) = (valprev, index) per row, read at the start and written at the end
// (valprev in -32768..32767, index in 0..88: the caller checks). codes: one 4-bit code
// (0..15) per byte, (channels, n). Rows run in parallel; each row is serial.
void ima_adpcm_encode(const int16_t* pcm, int64_t channels, int64_t n, uint8_t* codes,
                      int32_t* state);
void ima_adpcm_decode(const uint8_t* codes, int64_t channels, int64_t n, int16_t* pcm,
                      int32_t* state);

enum DpcmQuantizer : int { kDpcmUniform = 0, kDpcmMuLaw = 1 };

struct DpcmArgs {
  int64_t t = 0, c = 0;           // x, xh, codes: (t, c) row-major
  const float* coef = nullptr;    // (order, c): coef[(k - 1) * c + ch] = a_k of channel ch
  const float* step = nullptr;    // (c): s (kUniform) or R (kMuLaw), > 0
  int order = 1;                  // 1..4
  int bits = 4;                   // 1..8 (kMuLaw: 2..8)
  int quantizer = kDpcmUniform;
  float mu = 255.0f;              // kMuLaw
};

// Encode x into codes (uint8) and the reconstruction xh; decode codes into xh. Channels run in
// parallel (blocks of channels per task); every ISA and thread count gives the same bits.
void dpcm_encode_f32(const DpcmArgs& a, const float* x, uint8_t* codes, float* xh);
void dpcm_decode_f32(const DpcmArgs& a, const uint8_t* codes, float* xh);

}  // namespace qk
