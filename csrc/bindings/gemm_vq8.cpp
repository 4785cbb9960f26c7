// Bindings of qk::gemm_vq8 (the VQ matmul's int8 fast mode, csrc/cpu/gemm/vq8/api.h) over raw
// addresses: shape rules, size and pointer checks, GIL release. python/qkern/ops/vq8.py checks
// the torch tensors. A code out of range or an unsupported shape comes back as ValueError.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/gemm/vq8/api.h"

namespace py = pybind11;

namespace {

void expect(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error("gemm_vq8: " + msg);
}

// Returns true when x holds NaN/Inf (y unspecified). scales / bias 0: none.
bool gemm_vq8_raw(uintptr_t x, int64_t m, uintptr_t packed4, int64_t n, int64_t nv,
                  uintptr_t books8, uintptr_t bs, int64_t groups, int64_t kc, int64_t dim,
                  int64_t group_rows, uintptr_t scales, int64_t nseg, uintptr_t bias,
                  uintptr_t y, bool nibbles, uintptr_t tables) {
  expect(m >= 0 && n >= 0 && nv >= 0, "M, N and the number of vectors must be >= 0");
  expect(groups == (n + group_rows - 1) / std::max<int64_t>(group_rows, 1) || n == 0,
         std::to_string(groups) + " codebooks for " + std::to_string(n) + " rows in groups of " +
             std::to_string(group_rows));
  expect(qk::vq8_supported(n, nv, groups, kc, dim, group_rows, scales ? nseg : 1),
         "unsupported shape: dim 2, 4 or 8, K a multiple of 32, kc <= 256 (128 at dim 8), "
         "group_rows a multiple of 16 or one codebook, scale segments of a multiple of 32 "
         "columns");
  expect(!nibbles || qk::vq8_nibbles_fit(n, nv, groups, kc, dim, group_rows, scales ? nseg : 1),
         "4-bit codes need a codebook of <= 16 entries and a multiple of 8 vectors per row");
  qk::bind::checked_mul(m, nv, dim, "gemm_vq8: M x K");
  qk::bind::checked_mul(m, n, "gemm_vq8: M x N");
  qk::bind::checked_mul((n + 15) / 16 * 16, nv, "gemm_vq8: packed codes");
  if (m == 0 || n == 0) return false;
  expect(y && x && packed4 && books8 && bs, "null pointer");
  py::gil_scoped_release nogil;
  return qk::gemm_vq8(reinterpret_cast<const float*>(x), m,
                      reinterpret_cast<const uint8_t*>(packed4), n, nv,
                      reinterpret_cast<const int8_t*>(books8), reinterpret_cast<const float*>(bs),
                      groups, kc, dim, group_rows, reinterpret_cast<const float*>(scales), nseg,
                      reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(y), nibbles,
                      reinterpret_cast<const int8_t*>(tables));
}

static qk::bind::Register reg([](py::module_& m) {
  m.def("gemm_vq8_raw", &gemm_vq8_raw, py::arg("x"), py::arg("m"), py::arg("packed4"),
        py::arg("n"), py::arg("nv"), py::arg("books8"), py::arg("bs"), py::arg("groups"),
        py::arg("kc"), py::arg("dim"), py::arg("group_rows"), py::arg("scales"),
        py::arg("nseg"), py::arg("bias"), py::arg("y"), py::arg("nibbles"),
        py::arg("tables") = 0,
        "gemm_vq8 over data_ptr()s of checked contiguous tensors (tables: vq8_tables_raw's "
        "planes of books8, or 0: built per call); True when x had NaN/Inf");
  m.def("vq8_tables_raw", [](uintptr_t books8, int64_t groups, int64_t kc, int64_t dim,
                             uintptr_t tables) {
    expect(groups >= 0 && kc >= 1 && kc <= 256 && dim >= 1,
           "vq8_tables: groups >= 0, 1 <= kc <= 256, dim >= 1");
    qk::bind::checked_mul(groups, dim, 256, "vq8_tables: tables");
    if (groups == 0) return;
    expect(books8 && tables, "vq8_tables: null pointer");
    qk::vq8_tables(reinterpret_cast<const int8_t*>(books8), groups, kc, dim,
                   reinterpret_cast<int8_t*>(tables));
  }, "the codebook byte planes (groups, dim, 256) of int8 books8 (groups, kc, dim)");
  m.def("vq8_supported", &qk::vq8_supported, py::arg("n"), py::arg("nv"), py::arg("groups"),
        py::arg("kc"), py::arg("dim"), py::arg("group_rows"), py::arg("nseg"),
        "whether gemm_vq8 takes these shapes");
  m.def("vq8_nibbles_fit", &qk::vq8_nibbles_fit, py::arg("n"), py::arg("nv"), py::arg("groups"),
        py::arg("kc"), py::arg("dim"), py::arg("group_rows"), py::arg("nseg"),
        "whether gemm_vq8 takes these shapes with 4-bit codes");
});

}  // namespace
