// Bindings of the int8-weight matmuls (csrc/cpu/gemm/w8/api.h): argument checks, numpy plumbing
// and GIL release only.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/gemm/w8/api.h"

namespace py = pybind11;

namespace {

using I8 = py::array_t<int8_t, py::array::c_style | py::array::forcecast>;

using qk::bind::checked_mul;

// M, N, K >= 0 with M*K, M*N and the packed weight's bytes (N and K padded) <= 2^56
// (bindings/checked.h): no size arithmetic below or in the kernels can overflow.
void check_dims(int64_t m, int64_t n, int64_t k) {
  if (m < 0 || n < 0 || k < 0)
    throw py::value_error("M, N and K must be >= 0, got " + std::to_string(m) + ", " +
                          std::to_string(n) + ", " + std::to_string(k));
  checked_mul(m, k, "M x K");
  checked_mul(m, n, "M x N");
  checked_mul(n, k, "N x K");
  checked_mul(qk::bind::checked_size(n, "N") + 15, qk::bind::checked_size(k, "K") + 3,
              "packed N x K");
}

void check_len(const py::array& a, int64_t want, const char* name) {
  if (a.size() != want)
    throw py::value_error(std::string(name) + " has " + std::to_string(a.size()) +
                          " elements, expected " + std::to_string(want));
}

void check_packed(const I8& packed, int64_t n, int64_t k) {
  if (packed.size() != qk::w8_packed_nbytes(n, k))
    throw py::value_error("packed_w has " + std::to_string(packed.size()) +
                          " bytes; pack_w8 of (N=" + std::to_string(n) + ", K=" +
                          std::to_string(k) + ") codes has " +
                          std::to_string(qk::w8_packed_nbytes(n, k)));
}

void check_w8a8_k(int64_t k) {
  if (k > qk::kW8A8MaxK)
    throw py::value_error("K = " + std::to_string(k) + " exceeds " +
                          std::to_string(qk::kW8A8MaxK) +
                          ", the largest K whose int32 accumulation cannot overflow");
}

void init(py::module_& m) {
  m.def("w8_packed_nbytes", [](int64_t n, int64_t k) {
    check_dims(0, n, k);
    return qk::w8_packed_nbytes(n, k);
  });

  m.def("pack_w8", [](I8 codes, int64_t n, int64_t k) {
    check_dims(0, n, k);
    check_len(codes, n * k, "codes");
    py::array_t<int8_t> out(qk::w8_packed_nbytes(n, k));
    py::gil_scoped_release nogil;
    qk::pack_w8(codes.data(), n, k, out.mutable_data());
    return out;
  });

  m.def("unpack_w8", [](I8 packed, int64_t n, int64_t k) {
    check_dims(0, n, k);
    check_packed(packed, n, k);
    py::array_t<int8_t> out(n * k);
    py::gil_scoped_release nogil;
    qk::unpack_w8(packed.data(), n, k, out.mutable_data());
    return out;
  });

  // The integer core of W8A8, exposed for exact tests: activation codes must be in [-127, 127].
  m.def("gemm_s8s8_s32", [](I8 xq, I8 packed, int64_t m, int64_t n, int64_t k) {
    check_dims(m, n, k);
    check_len(xq, m * k, "xq");
    check_packed(packed, n, k);
    check_w8a8_k(k);
    const int8_t* q = xq.data();
    for (int64_t i = 0; i < m * k; ++i)
      if (q[i] == -128) throw py::value_error("activation codes must be in [-127, 127]");
    py::array_t<int32_t> out(m * n);
    py::gil_scoped_release nogil;
    qk::gemm_s8s8_s32(q, m, packed.data(), n, k, out.mutable_data());
    return out;
  });

  // Both float ops over raw addresses: ops/w8.py checks the torch tensors (dtype, contiguity,
  // sizes) and passes data_ptr()s, saving the numpy round trip of every call. bias 0: none.
  // Returns `bad` (W8A8 met NaN/Inf in x; always false for W8A16).
  m.def("gemm_w8_raw", [](bool a8, uintptr_t x, int64_t m, uintptr_t packed, uintptr_t w_scale,
                          uintptr_t bias, int64_t n, int64_t k, uintptr_t y) {
    check_dims(m, n, k);
    if (a8) check_w8a8_k(k);
    if (m == 0 || n == 0) return false;
    if (!x || !packed || !w_scale || !y) throw py::value_error("gemm_w8_raw: null pointer");
    const auto* xp = reinterpret_cast<const float*>(x);
    const auto* pp = reinterpret_cast<const int8_t*>(packed);
    const auto* sp = reinterpret_cast<const float*>(w_scale);
    const auto* bp = reinterpret_cast<const float*>(bias);
    auto* yp = reinterpret_cast<float*>(y);
    py::gil_scoped_release nogil;
    if (a8) return qk::gemm_w8a8(xp, m, pp, sp, bp, n, k, yp);
    qk::gemm_w8a16(xp, m, pp, sp, bp, n, k, yp);
    return false;
  });
}

qk::bind::Register reg(init);

}  // namespace
