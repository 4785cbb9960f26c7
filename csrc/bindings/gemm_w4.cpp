// Bindings of the int4 group-wise matmul (csrc/cpu/gemm/w4/api.h): argument checks, buffers and
// GIL release only.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include "bindings/arrays.h"
#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/gemm/w4/api.h"

namespace py = pybind11;

namespace {

constexpr auto kFlags = py::array::c_style | py::array::forcecast;
using I8 = py::array_t<int8_t, kFlags>;
using U8 = py::array_t<uint8_t, kFlags>;

std::string str(int64_t v) { return std::to_string(v); }

using qk::bind::new_array;

// K and the group: K a positive multiple of the group, the group a positive multiple of 32.
void check_shape(int64_t n, int64_t k, int64_t group) {
  if (n < 0) throw py::value_error("gemm_w4: N must be >= 0, got " + str(n));
  if (group <= 0 || group % qk::kW4Block != 0)
    throw py::value_error("gemm_w4: group_size must be a positive multiple of 32, got " +
                          str(group));
  if (k <= 0 || k % group != 0)
    throw py::value_error("gemm_w4: K = " + str(k) + " must be a positive multiple of group_size " +
                          str(group) + " (and so of 32)");
  // padded N x K (the packed codes' count) <= 2^56: no size arithmetic here or in the
  // kernels can overflow (bindings/checked.h).
  qk::bind::checked_mul(qk::w4_padded_rows(qk::bind::checked_size(n, "gemm_w4: N")),
                        qk::bind::checked_size(k, "gemm_w4: K"), "gemm_w4: N x K");
}

void check_size(const py::array& a, int64_t want, const char* name) {
  if (a.size() != want)
    throw py::value_error(std::string("gemm_w4: ") + name + " has " + str(a.size()) +
                          " elements, expected " + str(want));
}

py::array_t<uint8_t> pack(const I8& codes, int64_t group) {
  if (codes.ndim() != 2) throw py::value_error("pack_w4: codes must be 2-D (N, K)");
  const int64_t n = codes.shape(0), k = codes.shape(1);
  check_shape(n, k, group);
  const int8_t* c = codes.data();
  for (int64_t i = 0; i < n * k; ++i)
    if (c[i] < -8 || c[i] > 7)
      throw py::value_error("pack_w4: code " + str(c[i]) + " at flat index " + str(i) +
                            " is outside [-8, 7]");
  auto out = new_array<uint8_t>({qk::w4_packed_nbytes(n, k)});
  py::gil_scoped_release nogil;
  qk::pack_w4(c, n, k, out.mutable_data());
  return out;
}

py::array_t<int8_t> unpack(const U8& packed, int64_t n, int64_t k) {
  check_shape(n, k, qk::kW4Block);
  check_size(packed, qk::w4_packed_nbytes(n, k), "packed");
  py::array_t<int8_t> out({n, k});
  py::gil_scoped_release nogil;
  qk::unpack_w4(packed.data(), n, k, out.mutable_data());
  return out;
}

// The same over raw addresses: ops/w4.py checks dtypes, contiguity and sizes of the torch
// tensors and passes data_ptr()s (no numpy round trip: a decode step calls dozens of small
// GEMVs). zeros / bias / zeros_f 0: none. Returns `bad` (fast mode met NaN/Inf).
bool gemm_raw(uintptr_t x, int64_t m, uintptr_t packed, uintptr_t scales, uintptr_t zeros,
              uintptr_t bias, int64_t n, int64_t k, int64_t group, int mode, uintptr_t y,
              uintptr_t zeros_f, uintptr_t table8) {
  check_shape(n, k, group);
  if (mode != qk::kW4Exact && mode != qk::kW4Fast)
    throw py::value_error("gemm_w4: mode must be 0 (exact) or 1 (fast), got " + str(mode));
  if (table8 && (mode != qk::kW4Fast || zeros || zeros_f))
    throw py::value_error("gemm_w4: a code table (the 4-bit codebook mode) takes mode 1 (fast) "
                          "and no zero points");
  if (m < 0) throw py::value_error("gemm_w4: M must be >= 0");
  qk::bind::checked_mul(m, k, "gemm_w4: M x K");
  qk::bind::checked_mul(m, n, "gemm_w4: M x N");
  if (m == 0 || n == 0) return false;
  if (!x || !packed || !scales || !y) throw py::value_error("gemm_w4: null pointer");
  py::gil_scoped_release nogil;
  return qk::gemm_w4(reinterpret_cast<const float*>(x), m,
                     reinterpret_cast<const uint8_t*>(packed),
                     reinterpret_cast<const float*>(scales),
                     reinterpret_cast<const int32_t*>(zeros),
                     reinterpret_cast<const float*>(bias), n, k, group, mode,
                     reinterpret_cast<float*>(y), reinterpret_cast<const float*>(zeros_f),
                     reinterpret_cast<const uint8_t*>(table8));
}

const qk::bind::Register reg([](py::module_& m) {
  m.def("gemm_w4_raw", &gemm_raw, py::arg("x"), py::arg("m"), py::arg("packed"),
        py::arg("scales"), py::arg("zeros"), py::arg("bias"), py::arg("n"), py::arg("k"),
        py::arg("group"), py::arg("mode"), py::arg("y"), py::arg("zeros_f") = 0,
        py::arg("table8") = 0,
        "gemm_w4 over data_ptr()s of checked contiguous tensors; returns bad (table8: 16 "
        "uint8 codes t8 + 128 of the 4-bit codebook fast mode, or 0)");
  m.def("pack_w4", &pack, py::arg("codes"), py::arg("group"),
        "int8 codes (N, K) in [-8, 7] -> the packed int4 tile layout (uint8, flat)");
  m.def("unpack_w4", &unpack, py::arg("packed"), py::arg("n"), py::arg("k"),
        "inverse of pack_w4: int8 codes (N, K)");
});

}  // namespace
