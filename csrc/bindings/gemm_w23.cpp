// Bindings of the 2-bit / 3-bit group-wise matmul (csrc/cpu/gemm/w23/api.h): argument checks,
// buffers and GIL release only.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sys/mman.h>

#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include "bindings/arrays.h"
#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/gemm/w23/api.h"

namespace py = pybind11;

namespace {

constexpr auto kFlags = py::array::c_style | py::array::forcecast;
using U8 = py::array_t<uint8_t, kFlags>;

std::string str(int64_t v) { return std::to_string(v); }

using qk::bind::new_array;

void check_bits(int bits, const char* fn) {
  if (bits != 2 && bits != 3)
    throw py::value_error(std::string(fn) + ": bits must be 2 or 3, got " + str(bits));
}

// K and the group: K a positive multiple of the group, the group a positive multiple of 32.
void check_shape(int64_t n, int64_t k, int64_t group, const char* fn) {
  if (n < 0) throw py::value_error(std::string(fn) + ": N must be >= 0, got " + str(n));
  if (group <= 0 || group % qk::kW23Block != 0)
    throw py::value_error(std::string(fn) + ": group_size must be a positive multiple of 32, got " +
                          str(group));
  if (k <= 0 || k % group != 0)
    throw py::value_error(std::string(fn) + ": K = " + str(k) +
                          " must be a positive multiple of group_size " + str(group) +
                          " (and so of 32)");
  // padded N x K (the packed codes' count, times bits / 8 for the bytes) <= 2^56: no size
  // arithmetic here or in the kernels can overflow (bindings/checked.h).
  qk::bind::checked_mul(qk::w23_padded_rows(qk::bind::checked_size(n, fn)),
                        qk::bind::checked_size(k, fn), fn);
}

void check_size(const py::array& a, int64_t want, const char* name) {
  if (a.size() != want)
    throw py::value_error(std::string("gemm_w23: ") + name + " has " + str(a.size()) +
                          " elements, expected " + str(want));
}

// codes: the unsigned codes u = q - qmin in [0, 2^bits).
py::array_t<uint8_t> pack(const U8& codes, int bits, int64_t group) {
  check_bits(bits, "pack_w23");
  if (codes.ndim() != 2) throw py::value_error("pack_w23: codes must be 2-D (N, K)");
  const int64_t n = codes.shape(0), k = codes.shape(1);
  check_shape(n, k, group, "pack_w23");
  const uint8_t* c = codes.data();
  for (int64_t i = 0; i < n * k; ++i)
    if (c[i] >> bits)
      throw py::value_error("pack_w23: unsigned code " + str(c[i]) + " at flat index " + str(i) +
                            " is outside [0, " + str((1 << bits) - 1) + "]");
  auto out = new_array<uint8_t>({qk::w23_packed_nbytes(n, k, bits)});
  py::gil_scoped_release nogil;
  qk::pack_w23(c, n, k, bits, out.mutable_data());
  return out;
}

py::array_t<uint8_t> unpack(const U8& packed, int64_t n, int64_t k, int bits) {
  check_bits(bits, "unpack_w23");
  check_shape(n, k, qk::kW23Block, "unpack_w23");
  check_size(packed, qk::w23_packed_nbytes(n, k, bits), "packed");
  py::array_t<uint8_t> out({n, k});
  py::gil_scoped_release nogil;
  qk::unpack_w23(packed.data(), n, k, bits, out.mutable_data());
  return out;
}

void check_args(int64_t n, int64_t k, int64_t group, int bits, int qmin, int mode) {
  check_bits(bits, "gemm_w23");
  check_shape(n, k, group, "gemm_w23");
  if (qmin != 0 && qmin != -(1 << (bits - 1)))
    throw py::value_error("gemm_w23: qmin must be 0 (unsigned codes) or " +
                          str(-(1 << (bits - 1))) + " (signed " + str(bits) + "-bit), got " +
                          str(qmin));
  if (mode != qk::kW23Exact && mode != qk::kW23Fast)
    throw py::value_error("gemm_w23: mode must be 0 (exact) or 1 (fast), got " + str(mode));
}

// gemm_w23 over raw addresses: ops/w23.py checks dtypes, contiguity and sizes of the torch
// tensors (ops/checks.py) and passes data_ptr()s. zeros / bias / zeros_f 0: none. Returns `bad`.
bool gemm_raw(uintptr_t x, int64_t m, uintptr_t packed, uintptr_t scales, uintptr_t zeros,
              uintptr_t bias, int64_t n, int64_t k, int64_t group, int bits, int qmin, int mode,
              uintptr_t y, uintptr_t zeros_f) {
  check_args(n, k, group, bits, qmin, mode);
  if (m < 0) throw py::value_error("gemm_w23: M must be >= 0");
  qk::bind::checked_mul(m, k, "gemm_w23: M x K");
  qk::bind::checked_mul(m, n, "gemm_w23: M x N");
  if (m == 0 || n == 0) return false;
  if (!x || !packed || !scales || !y) throw py::value_error("gemm_w23: null pointer");
  py::gil_scoped_release nogil;
  return qk::gemm_w23(reinterpret_cast<const float*>(x), m,
                      reinterpret_cast<const uint8_t*>(packed),
                      reinterpret_cast<const float*>(scales),
                      reinterpret_cast<const int32_t*>(zeros),
                      reinterpret_cast<const float*>(bias), n, k, group, bits, qmin, mode,
                      reinterpret_cast<float*>(y), reinterpret_cast<const float*>(zeros_f));
}

const qk::bind::Register reg([](py::module_& m) {
  m.def("gemm_w23_raw", &gemm_raw, py::arg("x"), py::arg("m"), py::arg("packed"),
        py::arg("scales"), py::arg("zeros"), py::arg("bias"), py::arg("n"), py::arg("k"),
        py::arg("group"), py::arg("bits"), py::arg("qmin"), py::arg("mode"), py::arg("y"), py::arg("zeros_f") = 0,
        "gemm_w23 over data_ptr()s of checked contiguous tensors; returns bad");
  m.def("pack_w23", &pack, py::arg("codes"), py::arg("bits"), py::arg("group"),
        "uint8 unsigned codes (N, K) in [0, 2^bits) -> the packed 2/3-bit tile layout (flat)");
  m.def("unpack_w23", &unpack, py::arg("packed"), py::arg("n"), py::arg("k"), py::arg("bits"),
        "inverse of pack_w23: uint8 unsigned codes (N, K)");
});

}  // namespace
