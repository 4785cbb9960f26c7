// The AMX tile configuration (ldtilecfg's 64-byte operand, palette 1) the amx kernels load:
// tiles 0-7 each `rows` rows of `colsb` bytes. Include only from amx.cpp files.
#pragma once
#include <cstdint>

namespace qk {

struct alignas(64) AmxTileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};

  AmxTileConfig(const uint8_t (&r)[8], const uint16_t (&c)[8]) {
    for (int i = 0; i < 8; ++i) {
      rows[i] = r[i];
      colsb[i] = c[i];
    }
  }
};

}  // namespace qk
