// Binding of qk::gemm_fp8 (FP8-weight matmul): argument checks, buffers and GIL release only.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "bindings/arrays.h"
#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/gemm/fp8/api.h"

namespace py = pybind11;

namespace {

constexpr auto kFlags = py::array::c_style | py::array::forcecast;
using U8 = py::array_t<uint8_t, kFlags>;

std::string str(int64_t v) { return std::to_string(v); }

void expect(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error("gemm_fp8: " + msg);
}

// group_size 0 = per output channel (one scale per row), else a multiple of 16 dividing K.
int64_t effective_group(int64_t k, int64_t group) {
  if (group == 0) return k;
  expect(group > 0 && group % 16 == 0,
         "group_size must be 0 (per channel) or a positive multiple of 16, got " + str(group));
  expect(k % group == 0, "group_size " + str(group) + " does not divide K = " + str(k));
  return group;
}

// A copy of the codes in 2 MiB-aligned memory with transparent huge pages requested (arrays of
// 4 MiB and more): a GEMV streams the weights once per call and 4 KiB pages cost TLB misses.
py::array_t<uint8_t> pack(const U8& codes) {
  if (codes.ndim() != 2) throw py::value_error("pack_fp8: codes must be 2-D (N, K)");
  const py::ssize_t n = codes.shape(0), k = codes.shape(1);
  const size_t bytes = static_cast<size_t>(n) * static_cast<size_t>(k);
  auto out = qk::bind::new_array<uint8_t>({n, k});
  if (bytes) std::memcpy(out.mutable_data(), codes.data(), bytes);
  return out;
}

// gemm_fp8 over raw addresses: ops/fp8.py checks dtypes, contiguity and sizes of the torch
// tensors (ops/checks.py) and passes data_ptr()s. bias 0: none.
void gemm_raw(uintptr_t x, int64_t m, uintptr_t w, uintptr_t scales, uintptr_t bias, int64_t n,
              int64_t k, int64_t group, int fmt, uintptr_t y) {
  expect(n >= 0 && k > 0 && m >= 0,
         "M, N must be >= 0 and K > 0, got N = " + str(n) + ", K = " + str(k));
  expect(fmt == qk::kFp8E4M3 || fmt == qk::kFp8E5M2,
         "fmt must be 0 (fp8_e4m3) or 1 (fp8_e5m2), got " + str(fmt));
  const int64_t g = effective_group(k, group);
  qk::bind::checked_mul(m, k, "gemm_fp8: M x K");
  qk::bind::checked_mul(n, k, "gemm_fp8: N x K");
  qk::bind::checked_mul(m, n, "gemm_fp8: M x N");
  if (m == 0 || n == 0) return;
  expect(x && w && scales && y, "null pointer");
  py::gil_scoped_release nogil;
  qk::gemm_fp8(reinterpret_cast<const float*>(x), m, reinterpret_cast<const uint8_t*>(w),
               reinterpret_cast<const float*>(scales), reinterpret_cast<const float*>(bias), n,
               k, g, fmt, reinterpret_cast<float*>(y));
}

// Rows [n0, n1) of the layer (N rows) decoded into out.
void decode_raw(uintptr_t w, uintptr_t scales, int64_t n, int64_t n0, int64_t n1, int64_t k,
                int64_t group, int fmt, uintptr_t out) {
  expect(0 <= n0 && n0 <= n1 && n1 <= n,
         "rows [" + str(n0) + ", " + str(n1) + ") are not inside [0, " + str(n) + ")");
  expect(k > 0, "K must be > 0, got " + str(k));
  expect(fmt == qk::kFp8E4M3 || fmt == qk::kFp8E5M2,
         "fmt must be 0 (fp8_e4m3) or 1 (fp8_e5m2), got " + str(fmt));
  const int64_t g = effective_group(k, group);
  qk::bind::checked_mul(n, k, "gemm_fp8: N x K");
  if (n0 == n1) return;
  expect(w && scales && out, "null pointer");
  py::gil_scoped_release nogil;
  qk::fp8_decode(reinterpret_cast<const uint8_t*>(w), reinterpret_cast<const float*>(scales), n0,
                 n1, k, g, fmt, reinterpret_cast<float*>(out));
}

const qk::bind::Register reg([](py::module_& m) {
  m.def("fp8_decode_raw", &decode_raw, py::arg("w"), py::arg("scales"), py::arg("n"),
        py::arg("n0"), py::arg("n1"), py::arg("k"), py::arg("group_size"), py::arg("fmt"),
        py::arg("out"), "rows [n0, n1) of a gemm_fp8 weight decoded (float32) into out");
  m.def("gemm_fp8_raw", &gemm_raw, py::arg("x"), py::arg("m"), py::arg("w"), py::arg("scales"),
        py::arg("bias"), py::arg("n"), py::arg("k"), py::arg("group_size"), py::arg("fmt"),
        py::arg("y"), "gemm_fp8 over data_ptr()s of checked contiguous tensors");
  m.def("pack_fp8", &pack, py::arg("codes"),
        "a copy of uint8 FP8 codes (N, K) in huge-page memory when large");
});

}  // namespace
