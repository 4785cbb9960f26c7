// Overflow-checked size arithmetic for the bindings: every product of sizes (M*K, N*K, padded
// byte counts, n*bits) goes through checked_mul, so a huge argument is a ValueError instead of
// an int64 wrap-around that lets a size check pass and a kernel read or write out of bounds.
//
// Sizes are capped at kMaxSize = 2^56 elements (64 PiB: larger than any buffer), not only at
// INT64_MAX: the kernels pad sizes (to 16 rows, 4 bytes, 30-weight blocks...) and multiply them
// by bit widths <= 8 and small constants, and with every factor and product <= 2^56 none of
// that arithmetic can overflow either. python/qkern/ops/checks.py (size_product) applies the
// same cap, reading it from qkern._C.MAX_SIZE.
//
// std::invalid_argument becomes ValueError in pybind11.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace qk {
namespace bind {

constexpr int64_t kMaxSize = int64_t{1} << 56;

// v as a size: 0 <= v <= kMaxSize.
inline int64_t checked_size(int64_t v, const char* what) {
  if (v < 0 || v > kMaxSize)
    throw std::invalid_argument(std::string(what) + ": size " + std::to_string(v) +
                                (v < 0 ? " is negative" : " exceeds 2^56, the largest size"));
  return v;
}

// a * b for sizes a, b, b >= 0, with the product <= kMaxSize; else std::invalid_argument
// naming `what` and both factors.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  checked_size(a, what);
  checked_size(b, what);
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r) || r > kMaxSize)
    throw std::invalid_argument(std::string(what) + ": size " + std::to_string(a) + " x " +
                                std::to_string(b) + " exceeds 2^56, the largest size");
  return r;
}

inline int64_t checked_mul(int64_t a, int64_t b, int64_t c, const char* what) {
  return checked_mul(checked_mul(a, b, what), c, what);
}

// Every address in ps non-zero; else std::invalid_argument "<fn>: null pointer".
inline void nonnull(std::initializer_list<uintptr_t> ps, const char* fn) {
  for (auto p : ps)
    if (!p) throw std::invalid_argument(std::string(fn) + ": null pointer");
}

}  // namespace bind
}  // namespace qk
