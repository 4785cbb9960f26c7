// Bindings of the decode-step kernels (csrc/cpu/decode/api.h) over raw addresses: ops/decode.py
// checks the torch tensors (CPU float32, contiguous, shapes) and passes their data_ptr()s. Here:
// the sizes, the head layout, null pointers, and the GIL released around the kernels.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/decode/api.h"

namespace py = pybind11;

namespace {

using qk::bind::nonnull;

const float* cf(uintptr_t p) { return reinterpret_cast<const float*>(p); }
float* mf(uintptr_t p) { return reinterpret_cast<float*>(p); }

void init(py::module_& m) {
  m.def("rms_norm_raw", [](uintptr_t x, uintptr_t res, uintptr_t w, int64_t rows, int64_t n,
                           float eps, uintptr_t sum, uintptr_t out) {
    qk::bind::checked_mul(rows, n, "rms_norm rows x n");
    if (rows == 0 || n == 0) return;
    nonnull({x, w, out}, "rms_norm_raw");
    if (res && !sum) throw py::value_error("rms_norm_raw: a residual needs a sum output");
    py::gil_scoped_release nogil;
    qk::rms_norm_f32(cf(x), res ? cf(res) : nullptr, cf(w), rows, n, eps,
                     res ? mf(sum) : nullptr, mf(out));
  });
  m.def("silu_mul_raw", [](uintptr_t g, uintptr_t u, int64_t n, uintptr_t out) {
    qk::bind::checked_size(n, "silu_mul n");
    if (n == 0) return;
    nonnull({g, u, out}, "silu_mul_raw");
    py::gil_scoped_release nogil;
    qk::silu_mul_f32(cf(g), cf(u), n, mf(out));
  });
  m.def("attention_step_raw",
        [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t cos, uintptr_t sin,
           uintptr_t k_cache, uintptr_t v_cache, uintptr_t y, int64_t batch, int64_t heads,
           int64_t kv_heads, int64_t head_dim, int64_t max_len, int64_t pos, float scale) {
          using qk::bind::checked_mul;
          checked_mul(checked_mul(batch, heads, "attention_step"), head_dim, "attention_step");
          checked_mul(checked_mul(batch, kv_heads, "attention_step"),
                      checked_mul(max_len, head_dim, "attention_step"), "attention_step");
          if (kv_heads <= 0 || heads % kv_heads != 0)
            throw py::value_error("attention_step: heads (" + std::to_string(heads) +
                                  ") must be a positive multiple of kv_heads (" +
                                  std::to_string(kv_heads) + ")");
          if (head_dim <= 0 || head_dim % 2 != 0)
            throw py::value_error("attention_step: head_dim must be even and positive, got " +
                                  std::to_string(head_dim));
          if (pos < 0 || pos >= max_len)
            throw py::value_error("attention_step: pos " + std::to_string(pos) +
                                  " is outside the cache's " + std::to_string(max_len) +
                                  " positions");
          if (batch == 0 || heads == 0) return;
          nonnull({q, k, v, cos, sin, k_cache, v_cache, y}, "attention_step_raw");
          const qk::AttentionStep a{batch, heads, kv_heads, head_dim, max_len, pos, scale};
          py::gil_scoped_release nogil;
          qk::attention_step_f32(a, cf(q), cf(k), cf(v), cf(cos), cf(sin), mf(k_cache),
                                 mf(v_cache), mf(y));
        });
}

qk::bind::Register reg(init);

}  // namespace
