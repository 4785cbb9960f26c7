// pybind11 bindings of the CPU kernel core: argument checks, numpy buffer plumbing and GIL
// release only; the numerics live in csrc/core and csrc/cpu.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sys/mman.h>

#include <cstdlib>
#include <new>
#include <cstdint>
#include <string>

#include "bindings/arrays.h"
#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/quant/api.h"
#include "cpu/runtime/isa.h"
#include "cpu/runtime/threadpool.h"

namespace py = pybind11;
using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

namespace {

template <typename T>
py::array_t<T> new_array(int64_t n) {  // 1-D, huge pages from 4 MiB (bindings/arrays.h)
  return qk::bind::new_array<T>({static_cast<py::ssize_t>(n)});
}

using qk::bind::checked_mul;
using qk::bind::checked_size;

void check_groups(int64_t n, int64_t group, const char* what) {
  checked_size(n, what);
  if (group <= 0) throw py::value_error(std::string(what) + ": group_size must be positive");
  if (n % group != 0)
    throw py::value_error(std::string(what) + ": group_size " + std::to_string(group) +
                          " does not divide " + std::to_string(n) + " elements");
}

template <typename T>
const T* ptr(uintptr_t a) { return reinterpret_cast<const T*>(a); }

template <typename T>
T* out(uintptr_t a) { return reinterpret_cast<T*>(a); }

void check_ptrs(bool ok) {
  if (!ok) throw py::value_error("null pointer");
}

void check_bits(int bits) {
  if (bits < 1 || bits > 8) throw py::value_error("bits must be in 1..8, got " + std::to_string(bits));
}

void check_code_range(int qmin, int qmax) {
  if (qmin > qmax || qmin < -128 || qmax > 255 || (qmin < 0 && qmax > 127))
    throw py::value_error("code range [" + std::to_string(qmin) + ", " + std::to_string(qmax) +
                          "] does not fit one signed or unsigned byte");
}

// Zero points are used as `code - zp` in int32: keep them inside the code range so that
// arithmetic can never overflow.
void check_zero_points(const int32_t* z, int64_t n, int lo, int hi) {
  for (int64_t i = 0; i < n; ++i)
    if (z[i] < lo || z[i] > hi)
      throw py::value_error("zero_point " + std::to_string(z[i]) + " is outside the code range [" +
                            std::to_string(lo) + ", " + std::to_string(hi) + "]");
}

// pow2_mx_scale computes floor(log2 amax) - emax in int: float exponents lie in [-149, 127], so
// any |emax| beyond 256 only saturates the scale, and 2^31 would overflow.
void check_emax(int64_t emax) {
  if (emax < -256 || emax > 256)
    throw py::value_error("emax must be in [-256, 256] (float exponents lie in [-149, 127]), got " +
                          std::to_string(emax));
}

void check_rule(int rule) {
  if (rule < qk::kScaleAbsMax || rule > qk::kScaleMeanAbs) throw py::value_error("unknown scale rule id");
}

void check_rounding(int r, int shape) {
  if (r < 0 || r >= qk::kNumRoundings) throw py::value_error("unknown rounding mode id");
  if (shape < qk::kMidTread || shape > qk::kDeadZone) throw py::value_error("unknown quantizer id");
}

qk::CodebookSpec codebook_spec(uintptr_t values, uintptr_t value_codes, int64_t n, int sign_bit,
                               int rounding, uint64_t seed) {
  if (n < 1 || n > 256) throw py::value_error("codebook must have 1..256 values");
  check_ptrs(values && value_codes);
  const float* v = ptr<float>(values);
  for (int64_t i = 1; i < n; ++i)
    if (!(v[i - 1] < v[i])) throw py::value_error("codebook values must be strictly ascending");
  check_rounding(rounding, 0);
  return {v, ptr<uint8_t>(value_codes), static_cast<int>(n), sign_bit, rounding, seed};
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
  roundings["away"] = static_cast<int>(qk::kAway);
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
  m.attr("MAX_SIZE") = qk::bind::kMaxSize;  // the largest size / product of sizes (checked.h)

  m.def("cpu_has_avx2", &qk::cpu_has_avx2);
  m.def("cpu_has_avx512", &qk::cpu_has_avx512);
  m.def("cpu_has_avx512_bf16", &qk::cpu_has_avx512_bf16);
  m.def("cpu_has_avx512_vbmi", &qk::cpu_has_avx512_vbmi);
  m.def("cpu_has_amx", &qk::cpu_has_amx);
  m.def("cpu_has_amx_bf16", &qk::cpu_has_amx_bf16);
  m.def("get_isa", [] {
    switch (qk::active_isa()) {
      case qk::kIsaAmx: return std::string("amx");
      case qk::kIsaAvx512: return std::string("avx512");
      case qk::kIsaAvx2: return std::string("avx2");
      default: return std::string("scalar");
    }
  });
  m.def("set_isa", [](const std::string& isa) {
    if (isa == "scalar") qk::set_isa(qk::kIsaScalar);
    else if (isa == "avx2") qk::set_isa(qk::kIsaAvx2);
    else if (isa == "avx512") qk::set_isa(qk::kIsaAvx512);
    else if (isa == "amx" || isa == "auto") qk::set_isa(qk::kIsaAmx);
    else
      throw py::value_error("isa must be 'scalar', 'avx2', 'avx512', 'amx' or 'auto', got '" +
                            isa + "'");
  });
  m.def("set_num_threads", [](int64_t n) {
    const int64_t most = qk::max_num_threads();
    if (n < 1 || n > most)
      throw py::value_error("num_threads must be in 1.." + std::to_string(most) + " (" +
                            std::to_string(qk::kMaxThreadsPerHardwareThread) + " x the " +
                            std::to_string(qk::hardware_threads()) +
                            " hardware threads), got " + std::to_string(n));
    py::gil_scoped_release nogil;
    qk::set_num_threads(static_cast<int>(n));
  });
  m.def("max_num_threads", &qk::max_num_threads,
        "the largest set_num_threads: kMaxThreadsPerHardwareThread x the hardware threads");
  m.def("get_num_threads", &qk::get_num_threads);
  m.def("get_spin_us", &qk::spin_micros,
        "how long an idle pool worker spins for the next job before sleeping (microseconds)");
  m.def("set_spin_us", [](int64_t us) {
    if (us < 0 || us > 1000000)
      throw py::value_error("spin_us must be in 0..1000000 microseconds, got " +
                            std::to_string(us));
    qk::set_spin_micros(static_cast<int>(us));
  });

  // The element-wise ops over raw addresses: ops/cpu.py checks the torch tensors (dtypes,
  // contiguity, lengths: ops/checks.py) and passes data_ptr()s; 0 = none. The checks here keep
  // the kernels' arithmetic and memory safe. The quantize ops return `bad` (NaN/Inf met).
  m.def("quantize_affine_raw", [](uintptr_t x, int64_t n, uintptr_t scale, uintptr_t zp,
                                  int64_t group, int qmin, int qmax, int rounding, int shape,
                                  float dz_half, uint64_t seed, uintptr_t codes) {
    check_groups(n, group, "quantize_affine");
    check_rounding(rounding, shape);
    check_code_range(qmin, qmax);
    if (n == 0) return false;
    check_ptrs(x && scale && codes);
    if (zp) check_zero_points(ptr<int32_t>(zp), n / group, qmin, qmax);
    qk::AffineSpec spec{qmin, qmax, rounding, shape, dz_half, seed};
    py::gil_scoped_release nogil;
    return qk::quantize_affine(ptr<float>(x), n, group, ptr<float>(scale), ptr<int32_t>(zp), spec,
                               out<uint8_t>(codes));
  });

  m.def("quantize_affine_dynamic_raw", [](uintptr_t x, int64_t n, int64_t group, int qmin,
                                          int qmax, int rule, float qpos, int64_t emax,
                                          int rounding, int shape, float dz_half, uint64_t seed,
                                          uintptr_t scale, uintptr_t zp, uintptr_t codes) {
    check_groups(n, group, "quantize_affine_dynamic");
    check_emax(emax);
    check_rounding(rounding, shape);
    check_code_range(qmin, qmax);
    check_rule(rule);
    if (rule == qk::kScaleAbsMax && !(qpos > 0.0f)) throw py::value_error("qpos must be > 0");
    if (n == 0) return false;
    // zp may be null for the symmetric rules (their zero point is 0 and is not stored)
    check_ptrs(x && scale && (zp || rule != qk::kScaleMinMax) && codes);
    qk::AffineSpec spec{qmin, qmax, rounding, shape, dz_half, seed};
    py::gil_scoped_release nogil;
    return qk::quantize_affine_dynamic(ptr<float>(x), n, group, spec, rule, qpos, static_cast<int>(emax),
                                       out<float>(scale), out<int32_t>(zp), out<uint8_t>(codes));
  });

  m.def("dequantize_affine_raw", [](uintptr_t codes, int64_t n, uintptr_t scale, uintptr_t zp,
                                    int64_t group, bool is_signed, float offset, uintptr_t y) {
    check_groups(n, group, "dequantize_affine");
    if (n == 0) return;
    check_ptrs(codes && scale && y);
    if (zp) check_zero_points(ptr<int32_t>(zp), n / group, is_signed ? -128 : 0, is_signed ? 127 : 255);
    py::gil_scoped_release nogil;
    qk::dequantize_affine(ptr<uint8_t>(codes), n, group, ptr<float>(scale), ptr<int32_t>(zp),
                          is_signed, offset, out<float>(y));
  });

  m.def("quantize_codebook_raw", [](uintptr_t x, int64_t n, uintptr_t scale, uintptr_t values,
                                    uintptr_t value_codes, int64_t nv, int sign_bit, int64_t group,
                                    int rounding, uint64_t seed, uintptr_t codes) {
    check_groups(n, group, "quantize_codebook");
    auto spec = codebook_spec(values, value_codes, nv, sign_bit, rounding, seed);
    if (n == 0) return false;
    check_ptrs(x && scale && codes);
    py::gil_scoped_release nogil;
    return qk::quantize_codebook(ptr<float>(x), n, group, ptr<float>(scale), spec,
                                 out<uint8_t>(codes));
  });

  m.def("quantize_codebook_dynamic_raw", [](uintptr_t x, int64_t n, uintptr_t values,
                                            uintptr_t value_codes, int64_t nv, int sign_bit,
                                            int64_t group, int rule, float max_value,
                                            int64_t emax, int rounding, uint64_t seed,
                                            uintptr_t scale, uintptr_t codes) {
    check_groups(n, group, "quantize_codebook_dynamic");
    check_emax(emax);
    check_rule(rule);
    if (rule == qk::kScaleMinMax) throw py::value_error("codebook formats have no min/max (zero-point) scale rule");
    if (rule == qk::kScaleAbsMax && !(max_value > 0.0f)) throw py::value_error("max_value must be > 0");
    auto spec = codebook_spec(values, value_codes, nv, sign_bit, rounding, seed);
    if (n == 0) return false;
    check_ptrs(x && scale && codes);
    py::gil_scoped_release nogil;
    return qk::quantize_codebook_dynamic(ptr<float>(x), n, group, spec, rule, max_value,
                                         static_cast<int>(emax),
                                         out<float>(scale), out<uint8_t>(codes));
  });

  m.def("dequantize_lut_raw", [](uintptr_t codes, int64_t n, uintptr_t scale, uintptr_t lut,
                                 int64_t group, uintptr_t y) {
    check_groups(n, group, "dequantize_lut");
    if (n == 0) return;
    check_ptrs(codes && scale && lut && y);
    py::gil_scoped_release nogil;
    qk::dequantize_lut(ptr<uint8_t>(codes), n, group, ptr<float>(scale), ptr<float>(lut),
                       out<float>(y));
  });

  m.def("pack_bits_raw", [](uintptr_t codes, int64_t n, int bits, bool msb, uintptr_t packed) {
    check_bits(bits);
    if (n < 0) throw py::value_error("n must be >= 0");
    checked_mul(n, bits, "pack_bits");  // the kernel's n * bits
    if (n == 0) return;
    check_ptrs(codes && packed);
    py::gil_scoped_release nogil;
    qk::pack_bits(ptr<uint8_t>(codes), n, bits, msb, out<uint8_t>(packed));
  });

  m.def("unpack_bits_raw", [](uintptr_t packed, int64_t n, int bits, bool msb, uintptr_t codes) {
    check_bits(bits);
    if (n < 0) throw py::value_error("n must be >= 0");
    checked_mul(n, bits, "unpack_bits");  // the kernel's n * bits
    if (n == 0) return;
    check_ptrs(packed && codes);
    py::gil_scoped_release nogil;
    qk::unpack_bits(ptr<uint8_t>(packed), n, bits, msb, out<uint8_t>(codes));
  });

  m.def("g711_raw", [](const std::string& op, uintptr_t src, int64_t n, uintptr_t dst) {
    const bool encode = op == "mulaw_encode" || op == "alaw_encode";
    if (!encode && op != "mulaw_decode" && op != "alaw_decode")
      throw py::value_error("unknown G.711 op '" + op + "'");
    if (n < 0) throw py::value_error("n must be >= 0");
    checked_size(n, "g711");
    if (n == 0) return;
    check_ptrs(src && dst);
    py::gil_scoped_release nogil;
    if (op == "mulaw_encode") qk::mulaw_encode(ptr<int16_t>(src), n, out<uint8_t>(dst));
    else if (op == "alaw_encode") qk::alaw_encode(ptr<int16_t>(src), n, out<uint8_t>(dst));
    else if (op == "mulaw_decode") qk::mulaw_decode(ptr<uint8_t>(src), n, out<int16_t>(dst));
    else qk::alaw_decode(ptr<uint8_t>(src), n, out<int16_t>(dst));
  }, "mulaw_encode / alaw_encode (int16 -> uint8) or mulaw_decode / alaw_decode (uint8 -> int16)");

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
