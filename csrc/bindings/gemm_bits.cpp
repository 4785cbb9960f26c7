// Bindings of the binary / ternary weight matmuls (csrc/cpu/gemm/bits/api.h): shape checks,
// numpy plumbing and GIL release.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>

#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/gemm/bits/api.h"

namespace py = pybind11;

namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
using I8 = py::array_t<int8_t, py::array::c_style | py::array::forcecast>;

using qk::bind::checked_mul;
using qk::bind::checked_size;

// bits_packed_nbytes with every factor and the product <= 2^56 (bindings/checked.h).
int64_t packed_nbytes(int64_t N, int64_t K, bool ternary) {
  const int64_t rows = qk::bits_padded_rows(checked_size(N, "N"));
  const int64_t words = 4 * qk::bits_blocks(checked_size(K, "K")) * qk::bits_planes(ternary);
  return checked_mul(rows, words, "packed N x K");
}

void check_size(const py::array& a, int64_t want, const char* op, const char* name) {
  if (a.size() != want)
    throw py::value_error(std::string(op) + ": " + name + " has " + std::to_string(a.size()) +
                          " elements, expected " + std::to_string(want));
}

// Checks the shared arguments and returns M (rows of x).
int64_t check_args(const char* op, const F32& x, const U8& w, int64_t w_bytes,
                   const F32& alpha, const std::optional<F32>& bias, int64_t N, int64_t K) {
  if (N < 1 || K < 1) throw py::value_error(std::string(op) + ": N and K must be >= 1");
  if (x.size() % K != 0)
    throw py::value_error(std::string(op) + ": x has " + std::to_string(x.size()) +
                          " elements, not a multiple of K = " + std::to_string(K));
  check_size(w, w_bytes, op, "packed weight");
  check_size(alpha, N, op, "alpha");
  if (bias) check_size(*bias, N, op, "bias");
  return x.size() / K;
}

py::array_t<float> run(const char* op, bool ternary, const F32& x, const U8& w, const F32& alpha,
                       const std::optional<F32>& bias, int64_t N, int64_t K, bool xnor) {
  if (N < 1 || K < 1) throw py::value_error(std::string(op) + ": N and K must be >= 1");
  const int64_t M = check_args(op, x, w, packed_nbytes(N, K, ternary), alpha, bias, N, K);
  py::array_t<float> y(checked_mul(M, N, "M x N"));
  const float* b = bias ? bias->data() : nullptr;
  const float *xp = x.data(), *ap = alpha.data();
  const uint8_t* wp = w.data();
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    if (ternary) qk::gemm_ternary(xp, M, wp, ap, b, N, K, yp);
    else qk::gemm_binary(xp, M, wp, ap, b, N, K, xnor, yp);
  }
  return y;
}

// codes (N, K) -> the packed tile layout of csrc/cpu/gemm/bits/api.h, 1-D uint8.
template <typename Codes, typename Pack>
py::array_t<uint8_t> pack(const char* op, const Codes& codes, const char* range, bool ternary,
                          Pack fn) {
  if (codes.ndim() != 2)
    throw py::value_error(std::string(op) + ": codes must be 2-D (N, K)");
  const int64_t N = codes.shape(0), K = codes.shape(1);
  if (N < 1 || K < 1) throw py::value_error(std::string(op) + ": N and K must be >= 1");
  py::array_t<uint8_t> out(packed_nbytes(N, K, ternary));
  bool ok;
  {
    py::gil_scoped_release nogil;
    ok = fn(codes.data(), N, K, out.mutable_data());
  }
  if (!ok) throw py::value_error(std::string(op) + ": codes must be " + range);
  return out;
}

static qk::bind::Register reg([](py::module_& m) {
  m.def("bits_packed_nbytes", &packed_nbytes, py::arg("N"), py::arg("K"),
        py::arg("ternary"), "bytes of a packed binary / ternary weight (N, K)");
  m.def(
      "pack_binary",
      [](U8 codes) {
        return pack("pack_binary", codes, "0 (+1) or 1 (-1)", false, &qk::pack_binary);
      },
      py::arg("codes"));
  m.def(
      "pack_ternary",
      [](I8 codes) {
        return pack("pack_ternary", codes, "in {-1, 0, 1}", true, &qk::pack_ternary);
      },
      py::arg("codes"));
  m.def(
      "gemm_binary",
      [](F32 x, U8 wbits, F32 alpha, std::optional<F32> bias, int64_t N, int64_t K, bool xnor) {
        return run("gemm_binary", false, x, wbits, alpha, bias, N, K, xnor);
      },
      py::arg("x"), py::arg("wbits"), py::arg("alpha"), py::arg("bias"), py::arg("N"),
      py::arg("K"), py::arg("xnor"));
  m.def(
      "gemm_ternary",
      [](F32 x, U8 wpacked, F32 alpha, std::optional<F32> bias, int64_t N, int64_t K) {
        return run("gemm_ternary", true, x, wpacked, alpha, bias, N, K, false);
      },
      py::arg("x"), py::arg("wpacked"), py::arg("alpha"), py::arg("bias"), py::arg("N"),
      py::arg("K"));
  // The same over raw addresses (ops/bits.py passes torch tensors' data_ptr() after checking
  // dtypes, contiguity and sizes): no numpy round trip, a few microseconds per call that a
  // 4096 x 4096 binary GEMV notices. bias 0: none.
  m.def(
      "gemm_bits_raw",
      [](bool ternary, uintptr_t x, int64_t M, uintptr_t w, uintptr_t alpha, uintptr_t bias,
         int64_t N, int64_t K, bool xnor, uintptr_t y) {
        if (M < 0 || N < 1 || K < 1)
          throw py::value_error("gemm_bits_raw: M must be >= 0, N and K >= 1");
        checked_mul(M, K, "M x K");
        checked_mul(M, N, "M x N");
        packed_nbytes(N, K, ternary);
        if (M == 0) return;
        if (!x || !w || !alpha || !y) throw py::value_error("gemm_bits_raw: null pointer");
        const auto* xp = reinterpret_cast<const float*>(x);
        const auto* wp = reinterpret_cast<const uint8_t*>(w);
        const auto* ap = reinterpret_cast<const float*>(alpha);
        const auto* bp = reinterpret_cast<const float*>(bias);
        auto* yp = reinterpret_cast<float*>(y);
        py::gil_scoped_release nogil;
        if (ternary) qk::gemm_ternary(xp, M, wp, ap, bp, N, K, yp);
        else qk::gemm_binary(xp, M, wp, ap, bp, N, K, xnor, yp);
      },
      py::arg("ternary"), py::arg("x"), py::arg("M"), py::arg("w"), py::arg("alpha"),
      py::arg("bias"), py::arg("N"), py::arg("K"), py::arg("xnor"), py::arg("y"));
});

}  // namespace
