// Bindings of the signal coders (csrc/cpu/signal/api.h): argument, state and null-pointer
// checks, GIL release. python/qkern/signal.py checks the numpy arrays (dtype, shape,
// contiguity) and passes their addresses.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/signal/api.h"

namespace py = pybind11;

namespace {

void nonnull(std::initializer_list<uintptr_t> ps, const char* fn) {
  for (auto p : ps)
    if (!p) throw py::value_error(std::string(fn) + ": null pointer");
}

// state: int32 (channels, 2) = (valprev, index) per channel.
void check_states(const int32_t* st, int64_t channels, const char* fn) {
  for (int64_t c = 0; c < channels; ++c) {
    if (st[2 * c] < -32768 || st[2 * c] > 32767)
      throw py::value_error(std::string(fn) + ": state valprev must lie in -32768..32767, got " +
                            std::to_string(st[2 * c]));
    if (st[2 * c + 1] < 0 || st[2 * c + 1] > 88)
      throw py::value_error(std::string(fn) + ": state index must lie in 0..88, got " +
                            std::to_string(st[2 * c + 1]));
  }
}

void init(py::module_& m) {
  // pcm int16 (channels, n), codes uint8 (channels, n), state int32 (channels, 2).
  m.def("ima_adpcm_encode_raw", [](uintptr_t pcm, int64_t channels, int64_t n, uintptr_t codes,
                                   uintptr_t state) {
    if (channels < 0 || n < 0) throw py::value_error("ima_adpcm_encode: negative size");
    qk::bind::checked_mul(channels, n, "ima_adpcm_encode channels x n");
    if (channels == 0) return;
    nonnull({state}, "ima_adpcm_encode_raw");
    auto* st = reinterpret_cast<int32_t*>(state);
    check_states(st, channels, "ima_adpcm_encode");
    if (n == 0) return;
    nonnull({pcm, codes}, "ima_adpcm_encode_raw");
    py::gil_scoped_release nogil;
    qk::ima_adpcm_encode(reinterpret_cast<const int16_t*>(pcm), channels, n,
                         reinterpret_cast<uint8_t*>(codes), st);
  });
  m.def("ima_adpcm_decode_raw", [](uintptr_t codes, int64_t channels, int64_t n, uintptr_t pcm,
                                   uintptr_t state) {
    if (channels < 0 || n < 0) throw py::value_error("ima_adpcm_decode: negative size");
    qk::bind::checked_mul(channels, n, "ima_adpcm_decode channels x n");
    if (channels == 0) return;
    nonnull({state}, "ima_adpcm_decode_raw");
    auto* st = reinterpret_cast<int32_t*>(state);
    check_states(st, channels, "ima_adpcm_decode");
    if (n == 0) return;
    nonnull({pcm, codes}, "ima_adpcm_decode_raw");
    py::gil_scoped_release nogil;
    qk::ima_adpcm_decode(reinterpret_cast<const uint8_t*>(codes), channels, n,
                         reinterpret_cast<int16_t*>(pcm), st);
  });
  // x float32 (t, c) or 0 (decode), codes uint8 (t, c), xh float32 (t, c), coef float32
  // (order, c), step float32 (c) > 0. Encodes when x != 0, else decodes codes.
  m.def("dpcm_raw", [](uintptr_t x, uintptr_t codes, uintptr_t xh, int64_t t, int64_t c,
                       uintptr_t coef, uintptr_t step, int order, int bits, int quantizer,
                       float mu) {
    if (t < 0 || c < 0) throw py::value_error("dpcm: negative size");
    if (order < 1 || order > 4)
      throw py::value_error("dpcm: order must lie in 1..4, got " + std::to_string(order));
    if (quantizer != qk::kDpcmUniform && quantizer != qk::kDpcmMuLaw)
      throw py::value_error("dpcm: unknown quantizer id " + std::to_string(quantizer));
    const int lo = quantizer == qk::kDpcmMuLaw ? 2 : 1;
    if (bits < lo || bits > 8)
      throw py::value_error("dpcm: bits must lie in " + std::to_string(lo) + "..8, got " +
                            std::to_string(bits));
    if (!(mu > 0.0f)) throw py::value_error("dpcm: mu must be positive");
    qk::bind::checked_mul(t, c, "dpcm t x c");
    if (t == 0 || c == 0) return;
    nonnull({codes, xh, coef, step}, "dpcm_raw");
    qk::DpcmArgs a;
    a.t = t;
    a.c = c;
    a.coef = reinterpret_cast<const float*>(coef);
    a.step = reinterpret_cast<const float*>(step);
    for (int64_t i = 0; i < c; ++i)
      if (!(a.step[i] > 0.0f))
        throw py::value_error("dpcm: every step must be positive, channel " + std::to_string(i) +
                              " has " + std::to_string(a.step[i]));
    a.order = order;
    a.bits = bits;
    a.quantizer = quantizer;
    a.mu = mu;
    py::gil_scoped_release nogil;
    if (x)
      qk::dpcm_encode_f32(a, reinterpret_cast<const float*>(x), reinterpret_cast<uint8_t*>(codes),
                          reinterpret_cast<float*>(xh));
    else
      qk::dpcm_decode_f32(a, reinterpret_cast<const uint8_t*>(codes), reinterpret_cast<float*>(xh));
  });
}

qk::bind::Register reg(init);

}  // namespace
