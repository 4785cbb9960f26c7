// Bindings of qk::gemm_vq (fused matmul over vector-quantized weights, csrc/cpu/gemm/vq/api.h)
// over raw addresses: size and pointer checks, GIL release. python/qkern/ops/vq.py checks the
// torch tensors (dtypes, shapes, contiguity) and passes their data_ptr()s. A code out of
// range comes back as ValueError (std::invalid_argument).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/gemm/vq/api.h"

namespace py = pybind11;

namespace {

void expect(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error("gemm_vq: " + msg);
}

// The shape rules both entry points share (layout: 0 uint8 codes, 1 uint16 codes, 2 4-bit codes
// in 32-bit words, api.h gemm_vq_p4).
void check_codes(int64_t layout, int64_t n, int64_t nv, int64_t groups, int64_t kc, int64_t dim,
                 int64_t group_rows, bool scales, int64_t nseg) {
  expect(n >= 0 && nv >= 0, "N and the number of vectors must be >= 0");
  expect(layout >= 0 && layout <= 2, "layout must be 0, 1 or 2");
  const bool wide = layout == 1;
  expect(dim >= 1 && dim <= 64, "dim must be in 1..64, got " + std::to_string(dim));
  expect(layout != 2 || kc <= 16, "4-bit codes need a codebook of <= 16 entries");
  expect(kc >= 1 && kc <= (wide ? 65536 : 256),
         "the codebook size must be in 1.." + std::string(wide ? "65536" : "256") +
             " for " + (wide ? "uint16" : "uint8") + " codes, got " + std::to_string(kc));
  expect(group_rows >= 1, "group_rows must be >= 1");
  expect(groups == (n + group_rows - 1) / group_rows || (n == 0 && groups >= 0),
         std::to_string(groups) + " codebooks for " + std::to_string(n) + " rows in groups of " +
             std::to_string(group_rows));
  expect(!scales || (nseg >= 1 && nv % nseg == 0),
         "the number of scale segments must divide the number of vectors");
  qk::bind::checked_mul(groups, kc, dim, "gemm_vq: codebook size");
  expect(groups * kc * dim < (int64_t{1} << 31), "the codebooks must hold < 2^31 numbers");
  qk::bind::checked_mul((n + 15) / 16 * 16, nv, "gemm_vq: packed codes");
  qk::bind::checked_mul(n, nv, dim, "gemm_vq: N x K");
}

// scales / bias 0: none.
void gemm_vq_raw(uintptr_t x, int64_t m, uintptr_t packed, int64_t layout, int64_t n, int64_t nv,
                 uintptr_t books, int64_t groups, int64_t kc, int64_t dim, int64_t group_rows,
                 uintptr_t scales, int64_t nseg, uintptr_t bias, uintptr_t y) {
  expect(m >= 0, "M must be >= 0");
  check_codes(layout, n, nv, groups, kc, dim, group_rows, scales != 0, nseg);
  qk::bind::checked_mul(m, nv, dim, "gemm_vq: M x K");
  qk::bind::checked_mul(m, n, "gemm_vq: M x N");
  if (m == 0 || n == 0) return;
  expect(y && (nv == 0 || (x && packed && books)), "null pointer");
  py::gil_scoped_release nogil;
  const auto* xp = reinterpret_cast<const float*>(x);
  const auto* bp = reinterpret_cast<const float*>(books);
  const auto* sp = reinterpret_cast<const float*>(scales);
  const auto* bi = reinterpret_cast<const float*>(bias);
  auto* yp = reinterpret_cast<float*>(y);
  if (layout == 2)
    qk::gemm_vq_p4(xp, m, reinterpret_cast<const uint32_t*>(packed), n, nv, bp, groups, kc, dim,
                   group_rows, sp, nseg, bi, yp);
  else if (layout == 1)
    qk::gemm_vq(xp, m, reinterpret_cast<const uint16_t*>(packed), n, nv, bp, groups, kc, dim,
                group_rows, sp, nseg, bi, yp);
  else
    qk::gemm_vq(xp, m, reinterpret_cast<const uint8_t*>(packed), n, nv, bp, groups, kc, dim,
                group_rows, sp, nseg, bi, yp);
}

void decode_vq_raw(uintptr_t packed, int64_t layout, int64_t n, int64_t nv, uintptr_t books,
                   int64_t groups, int64_t kc, int64_t dim, int64_t group_rows, uintptr_t scales,
                   int64_t nseg, uintptr_t w) {
  check_codes(layout, n, nv, groups, kc, dim, group_rows, scales != 0, nseg);
  if (n == 0 || nv == 0) return;
  expect(packed && books && w, "null pointer");
  py::gil_scoped_release nogil;
  qk::vq_decode(reinterpret_cast<const void*>(packed), static_cast<int>(layout), n, nv,
                reinterpret_cast<const float*>(books), groups, kc, dim, group_rows,
                reinterpret_cast<const float*>(scales), nseg, reinterpret_cast<float*>(w));
}

static qk::bind::Register reg([](py::module_& m) {
  m.def("gemm_vq_raw", &gemm_vq_raw, py::arg("x"), py::arg("m"), py::arg("packed"),
        py::arg("layout"), py::arg("n"), py::arg("nv"), py::arg("books"), py::arg("groups"),
        py::arg("kc"), py::arg("dim"), py::arg("group_rows"), py::arg("scales"),
        py::arg("nseg"), py::arg("bias"), py::arg("y"),
        "gemm_vq over data_ptr()s of checked contiguous tensors");
  m.def("decode_vq_raw", &decode_vq_raw, py::arg("packed"), py::arg("layout"), py::arg("n"),
        py::arg("nv"), py::arg("books"), py::arg("groups"), py::arg("kc"), py::arg("dim"),
        py::arg("group_rows"), py::arg("scales"), py::arg("nseg"), py::arg("w"),
        "vq_decode over data_ptr()s of checked contiguous tensors");
});

}  // namespace
