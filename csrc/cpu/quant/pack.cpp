// Dense bit packing (docs/numerics.md "Bit packing") and the G.711 loops. Work is split into
// blocks of 8 elements, which always fill whole bytes, so threads never share a byte.
#include <cstring>

#include "core/g711.h"
#include "cpu/quant/api.h"
#include "cpu/runtime/threadpool.h"

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

// 8 codes -> `bits` bytes of the stream, as 64-bit word arithmetic: the codes' low bits are
// merged pairwise (bytes -> 16-bit -> 32-bit -> 64-bit lanes) with constant shifts; the MSB
// order is the same merge on byte-reversed words.
constexpr uint64_t lanes(int lane_bits, int keep_bits) {
  uint64_t m = 0, low = (keep_bits >= 64) ? ~0ull : ((1ull << keep_bits) - 1);
  for (int k = 0; k < 64; k += lane_bits) m |= low << k;
  return m;
}

inline uint64_t load_le(const uint8_t* p, int n) {
  uint64_t v = 0;
  std::memcpy(&v, p, static_cast<size_t>(n));  // little-endian host (x86-64)
  return v;
}

template <int kBits, bool kMsb>
inline void pack8(const uint8_t* c, uint8_t* out) {
  uint64_t v = load_le(c, 8);
  if (kMsb) v = __builtin_bswap64(v);
  v &= lanes(8, kBits);
  v = (v & lanes(16, 8)) | (((v >> 8) & lanes(16, 8)) << kBits);
  v = (v & lanes(32, 16)) | (((v >> 16) & lanes(32, 16)) << (2 * kBits));
  v = (v & lanes(64, 32)) | ((v >> 32) << (4 * kBits));
  if (kMsb) v = __builtin_bswap64(v << (64 - 8 * kBits));
  std::memcpy(out, &v, kBits);
}

// kWide: the 8 bytes at `in` may all be read (faster than a kBits-byte load).
template <int kBits, bool kMsb, bool kWide = false>
inline void unpack8(const uint8_t* in, uint8_t* c) {
  uint64_t v = load_le(in, kWide ? 8 : kBits);
  if (kWide && kBits < 8) v &= (uint64_t{1} << (8 * kBits)) - 1;
  if (kMsb) v = __builtin_bswap64(v) >> (64 - 8 * kBits);
  v = (v & lanes(64, 4 * kBits)) | (((v >> (4 * kBits)) & lanes(64, 4 * kBits)) << 32);
  v = (v & lanes(32, 2 * kBits)) | (((v >> (2 * kBits)) & lanes(32, 2 * kBits)) << 16);
  v = (v & lanes(16, kBits)) | (((v >> kBits) & lanes(16, kBits)) << 8);
  if (kMsb) v = __builtin_bswap64(v);
  std::memcpy(c, &v, 8);
}

using Block8Fn = void (*)(const uint8_t*, uint8_t*);

template <bool kMsb>
Block8Fn pick(int bits, bool pack) {
  switch (bits) {
    case 1: return pack ? pack8<1, kMsb> : unpack8<1, kMsb>;
    case 2: return pack ? pack8<2, kMsb> : unpack8<2, kMsb>;
    case 3: return pack ? pack8<3, kMsb> : unpack8<3, kMsb>;
    case 4: return pack ? pack8<4, kMsb> : unpack8<4, kMsb>;
    case 5: return pack ? pack8<5, kMsb> : unpack8<5, kMsb>;
    case 6: return pack ? pack8<6, kMsb> : unpack8<6, kMsb>;
    case 7: return pack ? pack8<7, kMsb> : unpack8<7, kMsb>;
    default: return pack ? pack8<8, kMsb> : unpack8<8, kMsb>;
  }
}

inline Block8Fn block_fn(int bits, bool msb, bool pack) {
  return msb ? pick<true>(bits, pack) : pick<false>(bits, pack);
}

// Blocks [b0, b1) with a per-width loop (the call inlines into each instantiation).
template <int kBits, bool kMsb, bool kPack>
void run_blocks(const uint8_t* in, int64_t b0, int64_t b1, uint8_t* out) {
  if (kPack) {
    for (int64_t b = b0; b < b1; ++b) pack8<kBits, kMsb>(in + 8 * b, out + kBits * b);
    return;
  }
  int64_t b = b0;
  for (; b + 8 < b1; ++b) unpack8<kBits, kMsb, true>(in + kBits * b, out + 8 * b);
  for (; b < b1; ++b) unpack8<kBits, kMsb>(in + kBits * b, out + 8 * b);
}

using BlocksFn = void (*)(const uint8_t*, int64_t, int64_t, uint8_t*);

template <bool kMsb, bool kPack>
BlocksFn blocks_for(int bits) {
  switch (bits) {
    case 1: return run_blocks<1, kMsb, kPack>;
    case 2: return run_blocks<2, kMsb, kPack>;
    case 3: return run_blocks<3, kMsb, kPack>;
    case 5: return run_blocks<5, kMsb, kPack>;
    case 6: return run_blocks<6, kMsb, kPack>;
    default: return run_blocks<7, kMsb, kPack>;
  }
}

inline BlocksFn blocks_fn(int bits, bool msb, bool pack) {
  if (pack) return msb ? blocks_for<true, true>(bits) : blocks_for<false, true>(bits);
  return msb ? blocks_for<true, false>(bits) : blocks_for<false, false>(bits);
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
    blocks_fn(bits, msb, true)(c, b0, b1, out);
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
    blocks_fn(bits, msb, false)(in, b0, b1, c);
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
    block_fn(bits, msb, true)(tmp_in, tmp_out);
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
    block_fn(bits, msb, false)(tmp_in, tmp_out);
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
