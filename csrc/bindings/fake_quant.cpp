// Binding of the fused LSQ / LSQ+ fake quantization (csrc/cpu/fakequant/api.h): size, range,
// scale and null pointer checks, and GIL release only. The scale values are checked here only
// (ops/fake_quant.py checks dtypes and shapes): one pass over C floats, no torch ops per call.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>

#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/fakequant/api.h"

namespace py = pybind11;

namespace {

// Sizes, clip range and step sizes; returns the element count (0: nothing to do).
int64_t check(int64_t outer, int64_t channels, int64_t inner, int64_t q_n, int64_t q_p,
              uintptr_t scale) {
  const int64_t n = qk::bind::checked_mul(outer, channels, inner, "lsq_fake_quantize");
  if (channels < 1)
    throw py::value_error("lsq_fake_quantize: needs at least one scale (C >= 1)");
  if (q_n < 0 || q_n > INT32_MAX)
    throw py::value_error("lsq_fake_quantize: q_n must be in [0, 2^31), got " +
                          std::to_string(q_n));
  if (q_p <= 0 || q_p > INT32_MAX)
    throw py::value_error("lsq_fake_quantize: q_p must be in [1, 2^31), got " +
                          std::to_string(q_p));
  if (!scale) throw py::value_error("fake_quantize_raw: null scale pointer");
  const auto* s = reinterpret_cast<const float*>(scale);
  for (int64_t c = 0; c < channels; ++c)
    if (!(s[c] > 0.0f) || !std::isfinite(s[c]) || !std::isfinite(1.0f / s[c])) {
      std::ostringstream msg;
      msg.precision(9);
      msg << "lsq_fake_quantize: scale must be finite and > 0 with 1/scale finite, got " << s[c]
          << " at index " << c;
      throw py::value_error(msg.str());
    }
  return n;
}

const float* in(uintptr_t a) { return reinterpret_cast<const float*>(a); }
float* out(uintptr_t a) { return reinterpret_cast<float*>(a); }

void init(py::module_& m) {
  // Over raw addresses: ops/fake_quant.py checks the torch tensors (float32, contiguous,
  // outer * C * inner elements, C scales) and passes their data_ptr()s; offset 0 = none.
  m.def("fake_quantize_raw", [](uintptr_t x, uintptr_t scale, uintptr_t offset, int64_t outer,
                                int64_t channels, int64_t inner, int64_t q_n, int64_t q_p,
                                uintptr_t y) {
    if (check(outer, channels, inner, q_n, q_p, scale) == 0) return;
    if (!x || !y) throw py::value_error("fake_quantize_raw: null pointer");
    py::gil_scoped_release nogil;
    qk::fake_quantize_f32(in(x), in(scale), offset ? in(offset) : nullptr, outer, channels, inner,
                          static_cast<int32_t>(q_n), static_cast<int32_t>(q_p), out(y));
  });
  m.def("fake_quantize_backward_raw",
        [](uintptr_t x, uintptr_t grad_y, uintptr_t scale, uintptr_t offset, int64_t outer,
           int64_t channels, int64_t inner, int64_t q_n, int64_t q_p, double grad_factor,
           uintptr_t grad_x, uintptr_t grad_scale, uintptr_t grad_offset) {
          const int64_t n = check(outer, channels, inner, q_n, q_p, scale);
          if (!std::isfinite(grad_factor))
            throw py::value_error("lsq_fake_quantize: grad_factor must be finite");
          if (!grad_scale || (n > 0 && (!x || !grad_y || !grad_x)))
            throw py::value_error("fake_quantize_backward_raw: null pointer");
          py::gil_scoped_release nogil;
          qk::fake_quantize_backward_f32(
              in(x), in(grad_y), in(scale), offset ? in(offset) : nullptr, outer, channels, inner,
              static_cast<int32_t>(q_n), static_cast<int32_t>(q_p), grad_factor, out(grad_x),
              out(grad_scale), grad_offset ? out(grad_offset) : nullptr);
        });
}

qk::bind::Register reg(init);

}  // namespace
