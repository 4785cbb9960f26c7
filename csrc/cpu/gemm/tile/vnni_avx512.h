// vpdpbusd as inline asm, for the AVX-512 translation units (include only from those:
// -mavx512vnni): GCC 12 copies (and spills) the accumulator around every
// _mm*_dpbusd_epi32 call, and does not fold _mm*_set1_epi32(load) into the instruction's
// EVEX {1to8} / {1to16} broadcast (it issues a separate vpbroadcastd, one more vector op per
// dot product). Measured on Zen 4 (docs/speed.md "Sixteenth pass"): the one-row int2 GEMV in
// cache 9-15 % faster with the broadcast form.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace qk {
namespace vnni {

typedef int32_t __attribute__((may_alias, aligned(1))) i32_any;

// acc + the 4-byte dot products of u (unsigned bytes) and x (signed bytes), lane by lane.
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i x) {
  asm("vpdpbusd %[x], %[u], %[a]" : [a] "+v"(acc) : [u] "v"(u), [x] "v"(x));
  return acc;
}

// acc + the 4-byte dot products of each lane of u (unsigned bytes) with the 4 signed bytes at x4.
inline __m256i dpbusd_x4(__m256i acc, __m256i u, const int8_t* x4) {
  asm("vpdpbusd %[x]%{1to8%}, %[u], %[a]"
      : [a] "+v"(acc)
      : [u] "v"(u), [x] "m"(*reinterpret_cast<const i32_any*>(x4)));
  return acc;
}

inline __m512i dpbusd_x4(__m512i acc, __m512i u, const int8_t* x4) {
  asm("vpdpbusd %[x]%{1to16%}, %[u], %[a]"
      : [a] "+v"(acc)
      : [u] "v"(u), [x] "m"(*reinterpret_cast<const i32_any*>(x4)));
  return acc;
}

}  // namespace vnni
}  // namespace qk
