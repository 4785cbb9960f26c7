// Binding of the fast Walsh-Hadamard transform (csrc/cpu/hadamard/api.h): size checks, null
// pointer check and GIL release only.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/hadamard/api.h"

namespace py = pybind11;

namespace {

void init(py::module_& m) {
  // Over raw addresses: ops/hadamard.py checks the torch tensors (float32, contiguous, rows x n
  // elements each) and passes their data_ptr()s; x == y transforms in place.
  m.def("fwht_raw", [](uintptr_t x, uintptr_t y, int64_t rows, int64_t n) {
    if (!qk::fwht_size_ok(n))
      throw py::value_error("fwht: the length n of the last dimension must be a power of two "
                            "(1, 2, 4, ...), got " + std::to_string(n));
    qk::bind::checked_mul(rows, n, "fwht rows x n");
    if (rows == 0) return;
    if (!x || !y) throw py::value_error("fwht_raw: null pointer");
    const auto* xp = reinterpret_cast<const float*>(x);
    auto* yp = reinterpret_cast<float*>(y);
    const uintptr_t bytes = static_cast<uintptr_t>(rows * n) * sizeof(float);
    if (x != y && x < y + bytes && y < x + bytes)
      throw py::value_error("fwht_raw: x and y overlap without being the same array");
    py::gil_scoped_release nogil;
    qk::fwht_f32(xp, yp, rows, n);
  });
}

qk::bind::Register reg(init);

}  // namespace
