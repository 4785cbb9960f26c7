// Binding of the log-domain matmul (csrc/cpu/logmm/api.h): argument checks and GIL release.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/logmm/api.h"

namespace py = pybind11;

namespace {

void init(py::module_& m) {
  // Over raw addresses: qkern/logdomain.py checks the tensors (uint8 codes (M, K) / (N, K),
  // float32 scales (M,) / (N,), float32 out (M, N), all contiguous).
  m.def("logmm_raw", [](uintptr_t xc, uintptr_t wc, uintptr_t xs, uintptr_t ws, uintptr_t out,
                        int64_t M, int64_t N, int64_t K, int bx, int bw, int frac_bits) {
    if (M < 0 || N < 0 || K < 0) throw py::value_error("logmm: negative size");
    if (bx < 2 || bx > 8 || bw < 2 || bw > 8)
      throw py::value_error("logmm: code bits must be in [2, 8], got " + std::to_string(bx) +
                            " and " + std::to_string(bw));
    if (frac_bits < 0 || frac_bits > 6)
      throw py::value_error("logmm: frac_bits must be in [0, 6], got " +
                            std::to_string(frac_bits));
    qk::bind::checked_mul(M, K, "logmm M x K");
    qk::bind::checked_mul(N, K, "logmm N x K");
    qk::bind::checked_mul(M, N, "logmm M x N");
    if (M == 0 || N == 0) return;
    if (!xc || !wc || !xs || !ws || !out) throw py::value_error("logmm_raw: null pointer");
    py::gil_scoped_release nogil;
    qk::logmm_f32(reinterpret_cast<const uint8_t*>(xc), reinterpret_cast<const uint8_t*>(wc),
                  reinterpret_cast<const float*>(xs), reinterpret_cast<const float*>(ws),
                  reinterpret_cast<float*>(out), M, N, K, bx, bw, frac_bits);
  });
}

qk::bind::Register reg(init);

}  // namespace
