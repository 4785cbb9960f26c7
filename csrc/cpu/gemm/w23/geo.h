// Where the codes of a 2-bit / 3-bit block are (api.h), as the SIMD kernels read them: step S
// is one 32-bit word per row holding count(S) codes first(S) .. first(S) + count(S) - 1, code
// first(S) + C at bit shift(S, C), kWidth bits wide. B = 2: words 0, 1 (16 codes each); B = 3:
// words 0, 1, 2 (8 codes each) and steps 3, 4, assembled from the spare bits (4 codes each:
// low bits of words 0 / 1 at bits 8 j + 6, high bit of word 2 at bit 8 j + 6 + i). Shared by
// avx2.cpp and avx512.cpp (with static_for, the compile-time loop over steps and codes); no
// intrinsics here.
#pragma once
#include <utility>

namespace qk {
namespace w23 {

template <int N, typename F, int... I>
inline void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
// f(std::integral_constant<int, I>{}) for I = 0..N-1, in order.
template <int N, typename F>
inline void static_for(F&& f) {
  static_for_impl<N>(f, std::make_integer_sequence<int, N>{});
}

template <int BITS>
struct Geo;

template <>
struct Geo<2> {
  static constexpr int kSteps = 2, kWidth = 2;
  static constexpr int first(int s) { return 16 * s; }
  static constexpr int count(int) { return 16; }
  static constexpr int shift(int, int c) { return 8 * (c % 4) + 2 * (c / 4); }
};

template <>
struct Geo<3> {
  static constexpr int kSteps = 5, kWidth = 3;
  static constexpr int first(int s) { return s < 3 ? 8 * s : 24 + 4 * (s - 3); }
  static constexpr int count(int s) { return s < 3 ? 8 : 4; }
  static constexpr int shift(int s, int c) { return s < 3 ? 8 * (c % 4) + 3 * (c / 4) : 8 * c; }
};

}  // namespace w23
}  // namespace qk
