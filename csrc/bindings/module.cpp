// pybind11 bindings of the CPU kernel core: argument checks, numpy buffer plumbing and GIL
// release only; the numerics live in csrc/core and csrc/cpu.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sys/mman.h>

#include <cstdlib>
#include <new>
#include <optional>
#include <string>

#include "bindings/arrays.h"
#include "bindings/registry.h"
#include "cpu/kernels.h"

namespace py = pybind11;
using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
using I16 = py::array_t<int16_t, py::array::c_style | py::array::forcecast>;

namespace {

template <typename T>
py::array_t<T> new_array(int64_t n) {  // 1-D, huge pages from 4 MiB (bindings/arrays.h)
  return qk::bind::new_array<T>({static_cast<py::ssize_t>(n)});
}

void check_groups(int64_t n, int64_t group, const char* what) {
  if (group <= 0) throw py::value_error(std::string(what) + ": group_size must be positive");
  if (n % group != 0)
    throw py::value_error(std::string(what) + ": group_size " + std::to_string(group) +
                          " does not divide " + std::to_string(n) + " elements");
}

void check_len(const py::array& a, int64_t want, const char* name) {
  if (a.size() != want)
    throw py::value_error(std::string(name) + " has " + std::to_string(a.size()) +
                          " elements, expected " + std::to_string(want));
}

void check_code_range(int qmin, int qmax) {
  if (qmin > qmax || qmin < -128 || qmax > 255 || (qmin < 0 && qmax > 127))
    throw py::value_error("code range [" + std::to_string(qmin) + ", " + std::to_string(qmax) +
                          "] does not fit one signed or unsigned byte");
}

// Zero points are used as `code - zp` in int32: keep them inside the code range so that
// arithmetic can never overflow.
void check_zero_points(const I32& zp, int lo, int hi) {
  const int32_t* z = zp.data();
  for (py::ssize_t i = 0; i < zp.size(); ++i)
    if (z[i] < lo || z[i] > hi)
      throw py::value_error("zero_point " + std::to_string(z[i]) + " is outside the code range [" +
                            std::to_string(lo) + ", " + std::to_string(hi) + "]");
}

void check_rule(int rule) {
  if (rule < qk::kScaleAbsMax || rule > qk::kScaleMeanAbs) throw py::value_error("unknown scale rule id");
}

void check_rounding(int r, int shape) {
  if (r < 0 || r >= qk::kNumRoundings) throw py::value_error("unknown rounding mode id");
  if (shape < qk::kMidTread || shape > qk::kDeadZone) throw py::value_error("unknown quantizer id");
}

qk::CodebookSpec codebook_spec(const F32& values, const U8& value_codes, int sign_bit,
                               int rounding, uint64_t seed) {
  int64_t n = values.size();
  if (n < 1 || n > 256) throw py::value_error("codebook must have 1..256 values");
  check_len(value_codes, n, "value_codes");
  const float* v = values.data();
  for (int64_t i = 1; i < n; ++i)
    if (!(v[i - 1] < v[i])) throw py::value_error("codebook values must be strictly ascending");
  check_rounding(rounding, 0);
  return {v, value_codes.data(), static_cast<int>(n), sign_bit, rounding, seed};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  for (auto init : qk::bind::inits()) init(m);  // the other binding files
  m.doc() = "qkern CPU kernels (torch-free)";

  // The enum values the ops take, by name: the Python side reads these instead of copying them.
  py::dict roundings, quantizers, scale_rules;
  roundings["nearest_even"] = static_cast<int>(qk::kNearestEven);
  roundings["half_away"] = static_cast<int>(qk::kHalfAway);
  roundings["half_up"] = static_cast<int>(qk::kHalfUp);
  roundings["floor"] = static_cast<int>(qk::kFloor);
  roundings["ceil"] = static_cast<int>(qk::kCeil);
  roundings["trunc"] = static_cast<int>(qk::kTrunc);
  roundings["stochastic"] = static_cast<int>(qk::kStochastic);
  quantizers["midtread"] = static_cast<int>(qk::kMidTread);
  quantizers["midrise"] = static_cast<int>(qk::kMidRise);
  quantizers["deadzone"] = static_cast<int>(qk::kDeadZone);
  scale_rules["absmax"] = static_cast<int>(qk::kScaleAbsMax);
  scale_rules["minmax"] = static_cast<int>(qk::kScaleMinMax);
  scale_rules["pow2_mx"] = static_cast<int>(qk::kScalePow2MX);
  scale_rules["meanabs"] = static_cast<int>(qk::kScaleMeanAbs);
  m.attr("ROUNDINGS") = roundings;
  m.attr("QUANTIZERS") = quantizers;
  m.attr("SCALE_RULES") = scale_rules;
  m.attr("NUM_ROUNDINGS") = qk::kNumRoundings;

  m.def("cpu_has_avx2", &qk::cpu_has_avx2);
  m.def("get_isa", [] { return std::string(qk::active_isa() == qk::kIsaAvx2 ? "avx2" : "scalar"); });
  m.def("set_isa", [](const std::string& isa) {
    if (isa == "scalar") qk::set_isa(qk::kIsaScalar);
    else if (isa == "avx2" || isa == "auto") qk::set_isa(qk::cpu_has_avx2() ? qk::kIsaAvx2 : qk::kIsaScalar);
    else throw py::value_error("isa must be 'scalar', 'avx2' or 'auto', got '" + isa + "'");
  });
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("num_threads must be >= 1");
    py::gil_scoped_release nogil;
    qk::set_num_threads(n);
  });
  m.def("get_num_threads", &qk::get_num_threads);

  m.def("quantize_affine", [](F32 x, F32 scale, std::optional<I32> zp, int64_t group, int qmin,
                              int qmax, int rounding, int shape, float dz_half, uint64_t seed) {
    int64_t n = x.size();
    check_groups(n, group, "quantize_affine");
    check_len(scale, n / group, "scale");
    if (zp) check_len(*zp, n / group, "zero_point");
    check_rounding(rounding, shape);
    check_code_range(qmin, qmax);
    if (zp) check_zero_points(*zp, qmin, qmax);
    auto codes = new_array<uint8_t>(n);
    const int32_t* zpp = zp ? zp->data() : nullptr;
    qk::AffineSpec spec{qmin, qmax, rounding, shape, dz_half, seed};
    bool bad;
    {
      py::gil_scoped_release nogil;
      bad = qk::quantize_affine(x.data(), n, group, scale.data(), zpp, spec, codes.mutable_data());
    }
    return py::make_tuple(codes, bad);
  });

  m.def("quantize_affine_dynamic", [](F32 x, int64_t group, int qmin, int qmax, int rule,
                                      float qpos, int emax, int rounding, int shape,
                                      float dz_half, uint64_t seed) {
    int64_t n = x.size();
    check_groups(n, group, "quantize_affine_dynamic");
    check_rounding(rounding, shape);
    check_code_range(qmin, qmax);
    check_rule(rule);
    if (rule == qk::kScaleAbsMax && !(qpos > 0.0f)) throw py::value_error("qpos must be > 0");
    auto codes = new_array<uint8_t>(n);
    auto scale = new_array<float>(n / group);
    auto zp = new_array<int32_t>(n / group);
    qk::AffineSpec spec{qmin, qmax, rounding, shape, dz_half, seed};
    bool bad;
    {
      py::gil_scoped_release nogil;
      bad = qk::quantize_affine_dynamic(x.data(), n, group, spec, rule, qpos, emax,
                                        scale.mutable_data(), zp.mutable_data(), codes.mutable_data());
    }
    return py::make_tuple(codes, scale, zp, bad);
  });

  m.def("dequantize_affine", [](U8 codes, F32 scale, std::optional<I32> zp, int64_t group,
                                bool is_signed, float offset) {
    int64_t n = codes.size();
    check_groups(n, group, "dequantize_affine");
    check_len(scale, n / group, "scale");
    if (zp) check_len(*zp, n / group, "zero_point");
    if (zp) check_zero_points(*zp, is_signed ? -128 : 0, is_signed ? 127 : 255);
    auto out = new_array<float>(n);
    const int32_t* zpp = zp ? zp->data() : nullptr;
    py::gil_scoped_release nogil;
    qk::dequantize_affine(codes.data(), n, group, scale.data(), zpp, is_signed, offset,
                          out.mutable_data());
    return out;
  });

  m.def("quantize_codebook", [](F32 x, F32 scale, F32 values, U8 value_codes, int sign_bit,
                                int64_t group, int rounding, uint64_t seed) {
    int64_t n = x.size();
    check_groups(n, group, "quantize_codebook");
    check_len(scale, n / group, "scale");
    auto spec = codebook_spec(values, value_codes, sign_bit, rounding, seed);
    auto codes = new_array<uint8_t>(n);
    bool bad;
    {
      py::gil_scoped_release nogil;
      bad = qk::quantize_codebook(x.data(), n, group, scale.data(), spec, codes.mutable_data());
    }
    return py::make_tuple(codes, bad);
  });

  m.def("quantize_codebook_dynamic", [](F32 x, F32 values, U8 value_codes, int sign_bit,
                                        int64_t group, int rule, float max_value, int emax,
                                        int rounding, uint64_t seed) {
    int64_t n = x.size();
    check_groups(n, group, "quantize_codebook_dynamic");
    check_rule(rule);
    if (rule == qk::kScaleMinMax) throw py::value_error("codebook formats have no min/max (zero-point) scale rule");
    if (rule == qk::kScaleAbsMax && !(max_value > 0.0f)) throw py::value_error("max_value must be > 0");
    auto spec = codebook_spec(values, value_codes, sign_bit, rounding, seed);
    auto codes = new_array<uint8_t>(n);
    auto scale = new_array<float>(n / group);
    bool bad;
    {
      py::gil_scoped_release nogil;
      bad = qk::quantize_codebook_dynamic(x.data(), n, group, spec, rule, max_value, emax,
                                          scale.mutable_data(), codes.mutable_data());
    }
    return py::make_tuple(codes, scale, bad);
  });

  m.def("dequantize_lut", [](U8 codes, F32 scale, F32 lut, int64_t group) {
    int64_t n = codes.size();
    check_groups(n, group, "dequantize_lut");
    check_len(scale, n / group, "scale");
    check_len(lut, 256, "lut");
    auto out = new_array<float>(n);
    py::gil_scoped_release nogil;
    qk::dequantize_lut(codes.data(), n, group, scale.data(), lut.data(), out.mutable_data());
    return out;
  });

  m.def("pack_bits", [](U8 codes, int bits, bool msb) {
    if (bits < 1 || bits > 8) throw py::value_error("bits must be in 1..8, got " + std::to_string(bits));
    int64_t n = codes.size();
    auto out = new_array<uint8_t>(qk::packed_nbytes(n, bits));
    py::gil_scoped_release nogil;
    qk::pack_bits(codes.data(), n, bits, msb, out.mutable_data());
    return out;
  });

  m.def("unpack_bits", [](U8 packed, int bits, int64_t n, bool msb) {
    if (bits < 1 || bits > 8) throw py::value_error("bits must be in 1..8, got " + std::to_string(bits));
    if (n < 0) throw py::value_error("n must be >= 0");
    int64_t need = qk::packed_nbytes(n, bits);
    if (packed.size() < need)
      throw py::value_error("packed buffer too short: " + std::to_string(packed.size()) +
                            " bytes, " + std::to_string(n) + " codes of " + std::to_string(bits) +
                            " bits need " + std::to_string(need));
    auto out = new_array<uint8_t>(n);
    py::gil_scoped_release nogil;
    qk::unpack_bits(packed.data(), n, bits, msb, out.mutable_data());
    return out;
  });

  m.def("mulaw_encode", [](I16 pcm) {
    auto out = new_array<uint8_t>(pcm.size());
    py::gil_scoped_release nogil;
    qk::mulaw_encode(pcm.data(), pcm.size(), out.mutable_data());
    return out;
  });
  m.def("alaw_encode", [](I16 pcm) {
    auto out = new_array<uint8_t>(pcm.size());
    py::gil_scoped_release nogil;
    qk::alaw_encode(pcm.data(), pcm.size(), out.mutable_data());
    return out;
  });
  m.def("mulaw_decode", [](U8 codes) {
    auto out = new_array<int16_t>(codes.size());
    py::gil_scoped_release nogil;
    qk::mulaw_decode(codes.data(), codes.size(), out.mutable_data());
    return out;
  });
  m.def("alaw_decode", [](U8 codes) {
    auto out = new_array<int16_t>(codes.size());
    py::gil_scoped_release nogil;
    qk::alaw_decode(codes.data(), codes.size(), out.mutable_data());
    return out;
  });
}
