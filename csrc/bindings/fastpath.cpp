// Helpers of the Python layer's per-call fast path (python/qkern/ops/checks.py): max|x| of a
// float32 buffer by address, for the int8-activation bound check before a fast-mode matmul (a
// torch reduction costs ~7 us per call; this, ~0.3 us for a decode step's 4096 values).
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>

#include "bindings/registry.h"

namespace py = pybind11;

namespace {

// max |x[i]| over n values; NaN when any is NaN (Inf when any is infinite).
float absmax_f32(const float* x, int64_t n) {
  float m[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  bool nan = false;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) {
      const float a = std::fabs(x[i + j]);
      nan |= a != a;
      m[j] = a > m[j] ? a : m[j];
    }
  for (; i < n; ++i) {
    const float a = std::fabs(x[i]);
    nan |= a != a;
    m[0] = a > m[0] ? a : m[0];
  }
  float r = m[0];
  for (int j = 1; j < 8; ++j) r = m[j] > r ? m[j] : r;
  return nan ? NAN : r;
}

qk::bind::Register reg([](py::module_& m) {
  m.def(
      "absmax_f32_raw",
      [](uintptr_t x, int64_t n) {
        if (n < 0) throw py::value_error("absmax_f32_raw: n must be >= 0");
        if (n > 0 && x == 0) throw py::value_error("absmax_f32_raw: null pointer");
        return n == 0 ? 0.0f : absmax_f32(reinterpret_cast<const float*>(x), n);
      },
      py::arg("x"), py::arg("n"),
      "max |x| of n contiguous float32 values at address x (NaN if any is NaN)");
});

}  // namespace
