// Binding of the fixed-point requantization (csrc/cpu/fixedpoint/api.h): argument checks, null
// pointer checks and GIL release only.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/fixedpoint/api.h"

namespace py = pybind11;

namespace {

void init(py::module_& m) {
  // Over raw addresses: ops/fixedpoint.py checks the torch tensors (acc int32 (rows, channels),
  // multiplier / shift int32 of length channels or 1, out int8 or int32 of acc's size, all
  // contiguous) and passes their data_ptr()s.
  m.def("requantize_raw", [](uintptr_t acc, int64_t rows, int64_t channels, uintptr_t m0,
                             uintptr_t shift, bool per_channel, int64_t zero_point, int64_t qmin,
                             int64_t qmax, uintptr_t out, int64_t out_bits) {
    const int64_t n = qk::bind::checked_mul(rows, channels, "requantize rows x channels");
    if (out_bits != 8 && out_bits != 32)
      throw py::value_error("requantize: out_bits must be 8 or 32, got " +
                            std::to_string(out_bits));
    const int64_t lo = out_bits == 8 ? -128 : qk::kInt32Min;
    const int64_t hi = out_bits == 8 ? 127 : qk::kInt32Max;
    if (qmin < lo || qmax > hi || qmin > qmax)
      throw py::value_error("requantize: need " + std::to_string(lo) + " <= qmin <= qmax <= " +
                            std::to_string(hi) + ", got qmin=" + std::to_string(qmin) +
                            ", qmax=" + std::to_string(qmax));
    if (zero_point < qk::kInt32Min || zero_point > qk::kInt32Max)
      throw py::value_error("requantize: zero_point must fit int32, got " +
                            std::to_string(zero_point));
    if (n == 0) return;
    if (!acc || !m0 || !shift || !out) throw py::value_error("requantize_raw: null pointer");
    const auto* sp = reinterpret_cast<const int32_t*>(shift);
    for (int64_t c = 0, nc = per_channel ? channels : 1; c < nc; ++c)
      if (!qk::requant_shift_ok(sp[c]))
        throw py::value_error("requantize: every shift must be in [-31, 30], got " +
                              std::to_string(sp[c]) + " at channel " + std::to_string(c));
    const qk::Requant q{reinterpret_cast<const int32_t*>(m0), sp, per_channel,
                        static_cast<int32_t>(zero_point), static_cast<int32_t>(qmin),
                        static_cast<int32_t>(qmax)};
    const auto* ap = reinterpret_cast<const int32_t*>(acc);
    py::gil_scoped_release nogil;
    if (out_bits == 8)
      qk::requantize_s32_s8(ap, rows, channels, q, reinterpret_cast<int8_t*>(out));
    else
      qk::requantize_s32_s32(ap, rows, channels, q, reinterpret_cast<int32_t*>(out));
  });
}

qk::bind::Register reg(init);

}  // namespace
