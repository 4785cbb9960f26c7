// Bindings of qk::gemm_lut4 / gemm_lut4_dq (fused 4-bit codebook matmul) over raw addresses:
// shape checks and GIL release only.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/gemm/lut4/api.h"

namespace py = pybind11;

namespace {

void expect(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error("gemm_lut4: " + msg);
}

// The AVX2 GEMV reads 16 codes at a time and the AVX2 GEMM decodes tiles of 512 columns a
// group at a time: any other group would read or write out of bounds (python/qkern/ops/lut4.py
// cpu_group_error states the same rule).
void check_group(int64_t group) {
  expect(group % 16 == 0 && 512 % group == 0,
         "group_size must be a multiple of 16 dividing 512 (16, 32, 64, 128, 256, 512), got " +
             std::to_string(group));
}

// ops/lut4.py checks dtypes, contiguity and sizes of the torch
// tensors (ops/checks.py) and passes data_ptr()s. bias 0: none.
void check_raw(int64_t m, int64_t n, int64_t k, int64_t group, bool ok) {
  expect(n >= 0 && k > 0 && m >= 0, "M, N must be >= 0 and K > 0");
  expect(group > 0 && k % group == 0, "group_size " + std::to_string(group) +
                                          " does not divide K = " + std::to_string(k));
  check_group(group);
  qk::bind::checked_mul(m, k, "gemm_lut4: M x K");
  qk::bind::checked_mul(n, k, "gemm_lut4: N x K");
  qk::bind::checked_mul(m, n, "gemm_lut4: M x N");
  expect(ok, "null pointer");
}

void gemm_lut4_raw(uintptr_t x, int64_t m, uintptr_t packed, uintptr_t scales, uintptr_t table,
                   uintptr_t bias, int64_t n, int64_t k, int64_t group, uintptr_t y) {
  check_raw(m, n, k, group, m == 0 || n == 0 || (x && packed && scales && table && y));
  if (m == 0 || n == 0) return;
  py::gil_scoped_release nogil;
  qk::gemm_lut4(reinterpret_cast<const float*>(x), m, reinterpret_cast<const uint8_t*>(packed),
                reinterpret_cast<const float*>(scales), reinterpret_cast<const float*>(table),
                reinterpret_cast<const float*>(bias), n, k, group, reinterpret_cast<float*>(y));
}

void gemm_lut4_dq_raw(uintptr_t x, int64_t m, uintptr_t packed, uintptr_t qscales,
                      uintptr_t scale2, float mean, uintptr_t table, uintptr_t bias, int64_t n,
                      int64_t k, int64_t group, int64_t dq_group, uintptr_t y) {
  expect(dq_group > 0, "dq_group (blocks per second-level scale) must be positive, got " +
                           std::to_string(dq_group));
  qk::bind::checked_size(dq_group, "gemm_lut4_dq: dq_group");  // (h + 1) * dq_group stays small
  check_raw(m, n, k, group,
            m == 0 || n == 0 || (x && packed && qscales && scale2 && table && y));
  if (m == 0 || n == 0) return;
  py::gil_scoped_release nogil;
  qk::gemm_lut4_dq(reinterpret_cast<const float*>(x), m,
                   reinterpret_cast<const uint8_t*>(packed),
                   reinterpret_cast<const int8_t*>(qscales),
                   reinterpret_cast<const float*>(scale2), mean, dq_group,
                   reinterpret_cast<const float*>(table), reinterpret_cast<const float*>(bias),
                   n, k, group, reinterpret_cast<float*>(y));
}

// Rows [n0, n1) of the layer (N rows) decoded into w; qscales / scale2 (dq_group > 0) when
// scales is 0.
void lut4_decode_raw(uintptr_t packed, uintptr_t scales, uintptr_t qscales, uintptr_t scale2,
                     float mean, int64_t dq_group, uintptr_t table, int64_t n, int64_t n0,
                     int64_t n1, int64_t k, int64_t group, uintptr_t w) {
  expect(0 <= n0 && n0 <= n1 && n1 <= n, "rows [" + std::to_string(n0) + ", " +
                                             std::to_string(n1) + ") are not inside [0, " +
                                             std::to_string(n) + ")");
  expect(scales || dq_group > 0, "dq_group must be positive, got " + std::to_string(dq_group));
  check_raw(n1 - n0, n, k, group,
            n0 == n1 || (packed && (scales || (qscales && scale2)) && table && w));
  if (n0 == n1) return;
  py::gil_scoped_release nogil;
  qk::lut4_decode(reinterpret_cast<const uint8_t*>(packed),
                  reinterpret_cast<const float*>(scales),
                  reinterpret_cast<const int8_t*>(qscales),
                  reinterpret_cast<const float*>(scale2), mean, dq_group,
                  reinterpret_cast<const float*>(table), n0, n1, k, group,
                  reinterpret_cast<float*>(w));
}

static qk::bind::Register reg([](py::module_& m) {
  m.def("gemm_lut4_raw", &gemm_lut4_raw, py::arg("x"), py::arg("m"), py::arg("packed"),
        py::arg("scales"), py::arg("table"), py::arg("bias"), py::arg("n"), py::arg("k"),
        py::arg("group_size"), py::arg("y"),
        "gemm_lut4 over data_ptr()s of checked contiguous tensors");
  m.def("gemm_lut4_dq_raw", &gemm_lut4_dq_raw, py::arg("x"), py::arg("m"), py::arg("packed"),
        py::arg("qscales"), py::arg("scale2"), py::arg("mean"), py::arg("table"),
        py::arg("bias"), py::arg("n"), py::arg("k"), py::arg("group_size"),
        py::arg("dq_group"), py::arg("y"),
        "gemm_lut4_dq over data_ptr()s of checked contiguous tensors");
  m.def("lut4_decode_raw", &lut4_decode_raw, py::arg("packed"), py::arg("scales"),
        py::arg("qscales"), py::arg("scale2"), py::arg("mean"), py::arg("dq_group"),
        py::arg("table"), py::arg("n"), py::arg("n0"), py::arg("n1"), py::arg("k"),
        py::arg("group_size"), py::arg("w"),
        "rows [n0, n1) of a gemm_lut4 weight decoded (float32) into w");
});

}  // namespace
