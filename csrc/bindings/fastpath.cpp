// Helpers of the Python layer's per-call fast path (python/qkern/ops/checks.py): max|x| of a
// float32 buffer by address, for the int8-activation bound check before a fast-mode matmul (a
// torch reduction costs ~7 us per call for a decode step's 4096 values; this ~0.3 us). It is
// the quantizers' own statistics kernel (qk::group_stats: ISA-dispatched, threaded when large).
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>

#include "bindings/registry.h"
#include "cpu/quant/api.h"

namespace py = pybind11;

namespace {

qk::bind::Register reg([](py::module_& m) {
  m.def(
      "absmax_f32_raw",
      [](uintptr_t x, int64_t n) {
        if (n < 0) throw py::value_error("absmax_f32_raw: n must be >= 0");
        if (n > 0 && x == 0) throw py::value_error("absmax_f32_raw: null pointer");
        if (n == 0) return 0.0f;
        qk::Stats s;
        py::gil_scoped_release nogil;
        qk::group_stats(reinterpret_cast<const float*>(x), n, n, false, &s);
        return s.bad ? NAN : s.amax;
      },
      py::arg("x"), py::arg("n"),
      "max |x| of n contiguous float32 values at address x (NaN if any is NaN or Inf)");
});

}  // namespace
