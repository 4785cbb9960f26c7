// Dense bit packing (docs/numerics.md "Bit packing") and the G.711 loops. Work is split into
// blocks of 8 elements, which always fill whole bytes, so threads never share a byte.
#include <cstring>

#include "core/g711.h"
#include "cpu/kernels.h"
#include "cpu/threadpool.h"

namespace qk {
namespace {

constexpr int64_t kBlocksPerTask = 1 << 13;  // 8-element blocks per pool task

template <typename F>
void for_blocks(int64_t n_blocks, F body) {
  if (n_blocks < 2 * kBlocksPerTask || pool_threads() == 1) {
    body(int64_t{0}, n_blocks);
    return;
  }
  int64_t tasks = (n_blocks + kBlocksPerTask - 1) / kBlocksPerTask;
  parallel_for(tasks, [&](int64_t t) {
    int64_t b0 = t * kBlocksPerTask;
    int64_t b1 = b0 + kBlocksPerTask < n_blocks ? b0 + kBlocksPerTask : n_blocks;
    body(b0, b1);
  });
}

// 8 codes -> `bits` bytes of the stream.
inline void pack8(const uint8_t* c, int bits, bool msb, uint8_t* out) {
  uint64_t mask = (1u << bits) - 1, acc = 0;
  if (msb) {
    for (int i = 0; i < 8; ++i) acc |= (c[i] & mask) << ((7 - i) * bits);
    for (int j = 0; j < bits; ++j) out[j] = static_cast<uint8_t>(acc >> (8 * (bits - 1 - j)));
  } else {
    for (int i = 0; i < 8; ++i) acc |= (c[i] & mask) << (i * bits);
    for (int j = 0; j < bits; ++j) out[j] = static_cast<uint8_t>(acc >> (8 * j));
  }
}

inline void unpack8(const uint8_t* in, int bits, bool msb, uint8_t* c) {
  uint64_t mask = (1u << bits) - 1, acc = 0;
  if (msb) {
    for (int j = 0; j < bits; ++j) acc |= static_cast<uint64_t>(in[j]) << (8 * (bits - 1 - j));
    for (int i = 0; i < 8; ++i) c[i] = static_cast<uint8_t>((acc >> ((7 - i) * bits)) & mask);
  } else {
    for (int j = 0; j < bits; ++j) acc |= static_cast<uint64_t>(in[j]) << (8 * j);
    for (int i = 0; i < 8; ++i) c[i] = static_cast<uint8_t>((acc >> (i * bits)) & mask);
  }
}

// The common widths as plain loops the compiler vectorizes.
void pack_blocks(const uint8_t* c, int64_t b0, int64_t b1, int bits, bool msb, uint8_t* out) {
  if (bits == 8) {
    std::memcpy(out + b0 * 8, c + b0 * 8, static_cast<size_t>((b1 - b0) * 8));
  } else if (bits == 4) {
    int lo = msb ? 1 : 0, hi = 1 - lo;
    for (int64_t j = b0 * 4; j < b1 * 4; ++j)
      out[j] = static_cast<uint8_t>((c[2 * j + lo] & 15) | ((c[2 * j + hi] & 15) << 4));
  } else {
    for (int64_t b = b0; b < b1; ++b) pack8(c + 8 * b, bits, msb, out + bits * b);
  }
}

void unpack_blocks(const uint8_t* in, int64_t b0, int64_t b1, int bits, bool msb, uint8_t* c) {
  if (bits == 8) {
    std::memcpy(c + b0 * 8, in + b0 * 8, static_cast<size_t>((b1 - b0) * 8));
  } else if (bits == 4) {  // one 16-bit store per byte: the compiler vectorizes this form
    const int lo_shift = msb ? 8 : 0, hi_shift = 8 - lo_shift;
    for (int64_t j = b0 * 4; j < b1 * 4; ++j) {
      uint16_t pair = static_cast<uint16_t>(((in[j] & 15u) << lo_shift) | ((in[j] >> 4u) << hi_shift));
      std::memcpy(c + 2 * j, &pair, 2);  // little-endian: low byte is element 2j
    }
  } else {
    for (int64_t b = b0; b < b1; ++b) unpack8(in + bits * b, bits, msb, c + 8 * b);
  }
}

}  // namespace

int64_t packed_nbytes(int64_t n, int bits) { return (n * bits + 7) / 8; }

void pack_bits(const uint8_t* codes, int64_t n, int bits, bool msb, uint8_t* out) {
  int64_t full = n / 8;
  for_blocks(full, [&](int64_t b0, int64_t b1) { pack_blocks(codes, b0, b1, bits, msb, out); });
  int64_t rem = n - full * 8;
  if (rem) {
    uint8_t tmp_in[8] = {0}, tmp_out[8] = {0};
    std::memcpy(tmp_in, codes + full * 8, static_cast<size_t>(rem));
    pack8(tmp_in, bits, msb, tmp_out);
    std::memcpy(out + full * bits, tmp_out, static_cast<size_t>((rem * bits + 7) / 8));
  }
}

void unpack_bits(const uint8_t* packed, int64_t n, int bits, bool msb, uint8_t* out) {
  int64_t full = n / 8;
  for_blocks(full, [&](int64_t b0, int64_t b1) { unpack_blocks(packed, b0, b1, bits, msb, out); });
  int64_t rem = n - full * 8;
  if (rem) {
    uint8_t tmp_in[8] = {0}, tmp_out[8] = {0};
    std::memcpy(tmp_in, packed + full * bits, static_cast<size_t>((rem * bits + 7) / 8));
    unpack8(tmp_in, bits, msb, tmp_out);
    std::memcpy(out + full * 8, tmp_out, static_cast<size_t>(rem));
  }
}

void mulaw_encode(const int16_t* pcm, int64_t n, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = mulaw_encode1(pcm[i]);
}
void mulaw_decode(const uint8_t* codes, int64_t n, int16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = mulaw_decode1(codes[i]);
}
void alaw_encode(const int16_t* pcm, int64_t n, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = alaw_encode1(pcm[i]);
}
void alaw_decode(const uint8_t* codes, int64_t n, int16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = alaw_decode1(codes[i]);
}

}  // namespace qk
