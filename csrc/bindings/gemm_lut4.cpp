// Binding of qk::gemm_lut4 (fused 4-bit codebook matmul): argument checks and buffers only.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "bindings/registry.h"
#include "cpu/gemm_lut4.h"

namespace py = pybind11;

namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
using I8 = py::array_t<int8_t, py::array::c_style | py::array::forcecast>;

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

void expect_size(const py::array& a, int64_t want, const char* name) {
  expect(a.size() == want, std::string(name) + " has " + std::to_string(a.size()) +
                               " elements, expected " + std::to_string(want));
}

py::array_t<float> gemm_lut4(const F32& x, const U8& packed, const F32& scales, const F32& table,
                             const std::optional<F32>& bias, int64_t n, int64_t k,
                             int64_t group) {
  expect(n >= 0 && k > 0, "N must be >= 0 and K > 0");
  expect(group > 0, "group_size must be positive");
  expect(k % group == 0, "group_size " + std::to_string(group) + " does not divide K = " +
                             std::to_string(k));
  check_group(group);
  expect(x.ndim() == 2 && x.shape(1) == k, "x must be 2-D (M, K) with K = " + std::to_string(k));
  expect_size(packed, n * (k / 2), "packed");
  expect_size(scales, n * (k / group), "scales");
  expect(table.size() >= 16, "table needs 16 values");
  if (bias) expect_size(*bias, n, "bias");
  const int64_t m = x.shape(0);
  py::array_t<float> y({static_cast<py::ssize_t>(m), static_cast<py::ssize_t>(n)});
  const float* bp = bias ? bias->data() : nullptr;
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    qk::gemm_lut4(x.data(), m, packed.data(), scales.data(), table.data(), bp, n, k, group, yp);
  }
  return y;
}

py::array_t<float> gemm_lut4_dq(const F32& x, const U8& packed, const I8& qscales,
                                const F32& scale2, float mean, const F32& table,
                                const std::optional<F32>& bias, int64_t n, int64_t k,
                                int64_t group, int64_t dq_group) {
  expect(n >= 0 && k > 0, "N must be >= 0 and K > 0");
  expect(group > 0, "group_size must be positive");
  expect(k % group == 0, "group_size " + std::to_string(group) + " does not divide K = " +
                             std::to_string(k));
  check_group(group);
  expect(dq_group > 0, "dq_group (blocks per second-level scale) must be positive, got " +
                           std::to_string(dq_group));
  expect(x.ndim() == 2 && x.shape(1) == k, "x must be 2-D (M, K) with K = " + std::to_string(k));
  const int64_t blocks = n * (k / group);
  expect_size(packed, n * (k / 2), "packed");
  expect_size(qscales, blocks, "qscales (one int8 code per block)");
  expect_size(scale2, (blocks + dq_group - 1) / dq_group, "scale2 (one per dq_group blocks)");
  expect(table.size() >= 16, "table needs 16 values");
  if (bias) expect_size(*bias, n, "bias");
  const int64_t m = x.shape(0);
  py::array_t<float> y({static_cast<py::ssize_t>(m), static_cast<py::ssize_t>(n)});
  const float* bp = bias ? bias->data() : nullptr;
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    qk::gemm_lut4_dq(x.data(), m, packed.data(), qscales.data(), scale2.data(), mean, dq_group,
                     table.data(), bp, n, k, group, yp);
  }
  return y;
}

static qk::bind::Register reg([](py::module_& m) {
  m.def("gemm_lut4", &gemm_lut4, py::arg("x"), py::arg("packed"), py::arg("scales"),
        py::arg("table"), py::arg("bias"), py::arg("n"), py::arg("k"), py::arg("group_size"),
        "y = x @ (table[codes] * scales)^T (+ bias) for 4-bit codes packed two per byte");
  m.def("gemm_lut4_dq", &gemm_lut4_dq, py::arg("x"), py::arg("packed"), py::arg("qscales"),
        py::arg("scale2"), py::arg("mean"), py::arg("table"), py::arg("bias"), py::arg("n"),
        py::arg("k"), py::arg("group_size"), py::arg("dq_group"),
        "gemm_lut4 with double-quantized block scales: s = max(float(qscales[b]) * "
        "scale2[b / dq_group] + mean, FLT_MIN)");
});

}  // namespace
