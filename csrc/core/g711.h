// ITU-T G.711 mu-law and A-law for 16-bit PCM: the segment encoders of the classic reference
// code, taking the top 14 (mu-law) or 13 (A-law) bits as the standard does.
#pragma once
#include <cstdint>
#include "qk_hd.h"

namespace qk {

// First segment whose end is >= v; 8 when v is beyond the last one.
QK_HD int g711_segment(int v, int first_end) {
  int end = first_end;
  for (int seg = 0; seg < 8; ++seg) {
    if (v <= end) return seg;
    end = end * 2 + 1;
  }
  return 8;
}

QK_HD uint8_t mulaw_encode1(int16_t pcm) {
  int v = static_cast<int>(pcm) >> 2;  // 14-bit sample (arithmetic shift)
  int mask = 0xFF;
  if (v < 0) {
    v = -v;
    mask = 0x7F;
  }
  if (v > 8159) v = 8159;
  v += 33;  // bias 0x84 >> 2
  int seg = g711_segment(v, 0x3F);
  int u = seg >= 8 ? 0x7F : ((seg << 4) | ((v >> (seg + 1)) & 0xF));
  return static_cast<uint8_t>(u ^ mask);
}

QK_HD int16_t mulaw_decode1(uint8_t code) {
  int u = ~code & 0xFF;
  int t = (((u & 0xF) << 3) + 0x84) << ((u & 0x70) >> 4);
  return static_cast<int16_t>((u & 0x80) ? (0x84 - t) : (t - 0x84));
}

QK_HD uint8_t alaw_encode1(int16_t pcm) {
  int v = static_cast<int>(pcm) >> 3;  // 13-bit sample
  int mask = 0xD5;
  if (v < 0) {
    mask = 0x55;
    v = -v - 1;
  }
  int seg = g711_segment(v, 0x1F);
  int a;
  if (seg >= 8) {
    a = 0x7F;
  } else {
    a = seg << 4;
    a |= (seg < 2 ? (v >> 1) : (v >> seg)) & 0xF;
  }
  return static_cast<uint8_t>(a ^ mask);
}

QK_HD int16_t alaw_decode1(uint8_t code) {
  int a = code ^ 0x55;
  int t = (a & 0xF) << 4;
  int seg = (a & 0x70) >> 4;
  if (seg == 0) t += 8;
  else if (seg == 1) t += 0x108;
  else t = (t + 0x108) << (seg - 1);
  return static_cast<int16_t>((a & 0x80) ? t : -t);
}

}  // namespace qk
