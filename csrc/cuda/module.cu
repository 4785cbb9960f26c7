// qkern._cuda: a torch-free pybind11 front end of the CUDA launchers (kernels.cuh).
//
// Arrays are passed as raw device addresses (Python ints, e.g. tensor.data_ptr(); 0 = null for
// the optional ones), streams as the integer cudaStream_t handle (torch's
// current_stream().cuda_stream), and `device` is the CUDA ordinal the addresses belong to.
// Every call is asynchronous on that stream and releases the GIL; launch errors raise
// RuntimeError. The quantizers clear and then set the device int at `bad` when the input holds
// NaN or Inf: the caller reads it after the stream has run. `seed` is an int64 carrying the
// bits of the uint64 seed.
//
// The matmuls (gemm.cuh) take their workspaces from the caller and a `path` (0 auto, 1 GEMV
// kernels, 2 GEMM kernels); their emulate_* twins run the same kernels on the host over host
// addresses (CPU tensors' data_ptr()), for tests on machines without a GPU.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include "core/matmul.h"
#include "cuda/gemm.cuh"
#include "cuda/kernels.cuh"

namespace py = pybind11;

namespace {

using Addr = std::uintptr_t;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("qkern._cuda.") + what + ": " + cudaGetErrorString(err));
  }
}

// Makes `device` current for the call and restores the previous device afterwards.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* what) {
    check(cudaGetDevice(&prev_), what);
    if (device >= 0 && device != prev_) {
      check(cudaSetDevice(device), what);
      restore_ = true;
    }
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool restore_ = false;
};

template <class T>
T* ptr(Addr a) {
  return reinterpret_cast<T*>(a);
}
cudaStream_t stream_of(Addr s) { return reinterpret_cast<cudaStream_t>(s); }

qk::AffineSpec affine_spec(int qmin, int qmax, int rounding, int shape, float deadzone_half,
                           int64_t seed) {
  return qk::AffineSpec{qmin, qmax, rounding, shape, deadzone_half, static_cast<uint64_t>(seed)};
}

qk::CodebookSpec codebook_spec(Addr values, Addr value_codes, int n_values, int sign_bit,
                               int rounding, int64_t seed) {
  return qk::CodebookSpec{ptr<const float>(values), ptr<const uint8_t>(value_codes), n_values,
                          sign_bit, rounding, static_cast<uint64_t>(seed)};
}

// Raises ValueError with the launcher's reason when the shapes are invalid.
void check_shapes(const char* msg) {
  if (msg) throw py::value_error(std::string("qkern._cuda.") + msg);
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: clear the error, report none
    return 0;
  }
  return n;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "qkern CUDA kernels (raw device addresses; no torch dependency)";
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("device_count", &device_count, "Number of CUDA devices (0 when none or no driver).");
  m.def("runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  m.def("driver_version", [] {
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess) cudaGetLastError();
    return v;
  });
  m.def("synchronize", [](int device) {
    DeviceGuard guard(device, "synchronize");
    check(cudaDeviceSynchronize(), "synchronize");
  }, arg("device"), nogil);

  m.def("quantize_affine",
        [](Addr x, int64_t n, int64_t group, Addr scale, Addr zp, int qmin, int qmax,
           int rounding, int shape, float deadzone_half, int64_t seed, Addr codes, Addr bad,
           int device, Addr stream) {
          DeviceGuard guard(device, "quantize_affine");
          check(qk::cuda::quantize_affine(ptr<const float>(x), n, group, ptr<const float>(scale),
                                          ptr<const int32_t>(zp),
                                          affine_spec(qmin, qmax, rounding, shape, deadzone_half,
                                                      seed),
                                          ptr<uint8_t>(codes), ptr<int>(bad), stream_of(stream)),
                "quantize_affine");
        },
        arg("x"), arg("n"), arg("group"), arg("scale"), arg("zp"), arg("qmin"), arg("qmax"),
        arg("rounding"), arg("shape"), arg("deadzone_half"), arg("seed"), arg("codes"),
        arg("bad"), arg("device"), arg("stream"), nogil);

  m.def("quantize_affine_dynamic",
        [](Addr x, int64_t n, int64_t group, int qmin, int qmax, int rounding, int shape,
           float deadzone_half, int64_t seed, int rule, float qpos, int emax, Addr scale_out,
           Addr zp_out, Addr codes, Addr bad, int device, Addr stream) {
          DeviceGuard guard(device, "quantize_affine_dynamic");
          check(qk::cuda::quantize_affine_dynamic(
                    ptr<const float>(x), n, group,
                    affine_spec(qmin, qmax, rounding, shape, deadzone_half, seed), rule, qpos,
                    emax, ptr<float>(scale_out), ptr<int32_t>(zp_out), ptr<uint8_t>(codes),
                    ptr<int>(bad), stream_of(stream)),
                "quantize_affine_dynamic");
        },
        arg("x"), arg("n"), arg("group"), arg("qmin"), arg("qmax"), arg("rounding"),
        arg("shape"), arg("deadzone_half"), arg("seed"), arg("rule"), arg("qpos"), arg("emax"),
        arg("scale_out"), arg("zp_out"), arg("codes"), arg("bad"), arg("device"), arg("stream"),
        nogil);

  m.def("dequantize_affine",
        [](Addr codes, int64_t n, int64_t group, Addr scale, Addr zp, bool is_signed,
           float offset, Addr out, int device, Addr stream) {
          DeviceGuard guard(device, "dequantize_affine");
          check(qk::cuda::dequantize_affine(ptr<const uint8_t>(codes), n, group,
                                            ptr<const float>(scale), ptr<const int32_t>(zp),
                                            is_signed, offset, ptr<float>(out),
                                            stream_of(stream)),
                "dequantize_affine");
        },
        arg("codes"), arg("n"), arg("group"), arg("scale"), arg("zp"), arg("is_signed"),
        arg("offset"), arg("out"), arg("device"), arg("stream"), nogil);

  m.def("quantize_codebook",
        [](Addr x, int64_t n, int64_t group, Addr scale, Addr values, Addr value_codes,
           int n_values, int sign_bit, int rounding, int64_t seed, Addr codes, Addr bad,
           int device, Addr stream) {
          DeviceGuard guard(device, "quantize_codebook");
          check(qk::cuda::quantize_codebook(
                    ptr<const float>(x), n, group, ptr<const float>(scale),
                    codebook_spec(values, value_codes, n_values, sign_bit, rounding, seed),
                    ptr<uint8_t>(codes), ptr<int>(bad), stream_of(stream)),
                "quantize_codebook");
        },
        arg("x"), arg("n"), arg("group"), arg("scale"), arg("values"), arg("value_codes"),
        arg("n_values"), arg("sign_bit"), arg("rounding"), arg("seed"), arg("codes"), arg("bad"),
        arg("device"), arg("stream"), nogil);

  m.def("quantize_codebook_dynamic",
        [](Addr x, int64_t n, int64_t group, Addr values, Addr value_codes, int n_values,
           int sign_bit, int rounding, int64_t seed, int rule, float max_value, int emax,
           Addr scale_out, Addr codes, Addr bad, int device, Addr stream) {
          DeviceGuard guard(device, "quantize_codebook_dynamic");
          check(qk::cuda::quantize_codebook_dynamic(
                    ptr<const float>(x), n, group,
                    codebook_spec(values, value_codes, n_values, sign_bit, rounding, seed), rule,
                    max_value, emax, ptr<float>(scale_out), ptr<uint8_t>(codes), ptr<int>(bad),
                    stream_of(stream)),
                "quantize_codebook_dynamic");
        },
        arg("x"), arg("n"), arg("group"), arg("values"), arg("value_codes"), arg("n_values"),
        arg("sign_bit"), arg("rounding"), arg("seed"), arg("rule"), arg("max_value"),
        arg("emax"), arg("scale_out"), arg("codes"), arg("bad"), arg("device"), arg("stream"),
        nogil);

  m.def("dequantize_lut",
        [](Addr codes, int64_t n, int64_t group, Addr scale, Addr lut, Addr out, int device,
           Addr stream) {
          DeviceGuard guard(device, "dequantize_lut");
          check(qk::cuda::dequantize_lut(ptr<const uint8_t>(codes), n, group,
                                         ptr<const float>(scale), ptr<const float>(lut),
                                         ptr<float>(out), stream_of(stream)),
                "dequantize_lut");
        },
        arg("codes"), arg("n"), arg("group"), arg("scale"), arg("lut"), arg("out"),
        arg("device"), arg("stream"), nogil);

  m.def("packed_nbytes", &qk::cuda::packed_nbytes, arg("n"), arg("bits"));

  m.def("pack_bits",
        [](Addr codes, int64_t n, int bits, bool msb, Addr out, int device, Addr stream) {
          DeviceGuard guard(device, "pack_bits");
          check(qk::cuda::pack_bits(ptr<const uint8_t>(codes), n, bits, msb, ptr<uint8_t>(out),
                                    stream_of(stream)),
                "pack_bits");
        },
        arg("codes"), arg("n"), arg("bits"), arg("msb"), arg("out"), arg("device"),
        arg("stream"), nogil);

  m.def("unpack_bits",
        [](Addr packed, int64_t n, int bits, bool msb, Addr out, int device, Addr stream) {
          DeviceGuard guard(device, "unpack_bits");
          check(qk::cuda::unpack_bits(ptr<const uint8_t>(packed), n, bits, msb,
                                      ptr<uint8_t>(out), stream_of(stream)),
                "unpack_bits");
        },
        arg("packed"), arg("n"), arg("bits"), arg("msb"), arg("out"), arg("device"),
        arg("stream"), nogil);

  m.def("mulaw_encode",
        [](Addr pcm, int64_t n, Addr out, int device, Addr stream) {
          DeviceGuard guard(device, "mulaw_encode");
          check(qk::cuda::mulaw_encode(ptr<const int16_t>(pcm), n, ptr<uint8_t>(out),
                                       stream_of(stream)),
                "mulaw_encode");
        },
        arg("pcm"), arg("n"), arg("out"), arg("device"), arg("stream"), nogil);
  m.def("mulaw_decode",
        [](Addr codes, int64_t n, Addr out, int device, Addr stream) {
          DeviceGuard guard(device, "mulaw_decode");
          check(qk::cuda::mulaw_decode(ptr<const uint8_t>(codes), n, ptr<int16_t>(out),
                                       stream_of(stream)),
                "mulaw_decode");
        },
        arg("codes"), arg("n"), arg("out"), arg("device"), arg("stream"), nogil);
  m.def("alaw_encode",
        [](Addr pcm, int64_t n, Addr out, int device, Addr stream) {
          DeviceGuard guard(device, "alaw_encode");
          check(qk::cuda::alaw_encode(ptr<const int16_t>(pcm), n, ptr<uint8_t>(out),
                                      stream_of(stream)),
                "alaw_encode");
        },
        arg("pcm"), arg("n"), arg("out"), arg("device"), arg("stream"), nogil);
  m.def("alaw_decode",
        [](Addr codes, int64_t n, Addr out, int device, Addr stream) {
          DeviceGuard guard(device, "alaw_decode");
          check(qk::cuda::alaw_decode(ptr<const uint8_t>(codes), n, ptr<int16_t>(out),
                                      stream_of(stream)),
                "alaw_decode");
        },
        arg("codes"), arg("n"), arg("out"), arg("device"), arg("stream"), nogil);
  // ---- quantized matmuls (gemm.cuh) -------------------------------------------------------------
  m.def("gemm_w4",
        [](Addr x, int64_t mrows, Addr packed, Addr scales, Addr zeros, Addr bias, int64_t n,
           int64_t k, int64_t group, int mode, Addr xq, Addr dx, Addr xs, Addr bad, Addr y,
           int path,
           int device, Addr stream) {
          check_shapes(qk::cuda::gemm_w4_check(mrows, n, k, group, mode, path));
          DeviceGuard guard(device, "gemm_w4");
          check(qk::cuda::gemm_w4(ptr<const float>(x), mrows, ptr<const uint8_t>(packed),
                                  ptr<const float>(scales), ptr<const int32_t>(zeros),
                                  ptr<const float>(bias), n, k, group, mode, ptr<int8_t>(xq),
                                  ptr<float>(dx), ptr<float>(xs), ptr<int>(bad),
                                  ptr<float>(y), path, stream_of(stream)),
                "gemm_w4");
        },
        arg("x"), arg("m"), arg("packed"), arg("scales"), arg("zeros"), arg("bias"), arg("n"),
        arg("k"), arg("group"), arg("mode"), arg("xq"), arg("dx"), arg("xs"), arg("bad"),
        arg("y"), arg("path"), arg("device"), arg("stream"), nogil);
  m.def("emulate_gemm_w4",
        [](Addr x, int64_t mrows, Addr packed, Addr scales, Addr zeros, Addr bias, int64_t n,
           int64_t k, int64_t group, int mode, Addr xq, Addr dx, Addr xs, Addr bad, Addr y,
           int path,
           bool reverse) {
          qk::cuda::emulate_gemm_w4(ptr<const float>(x), mrows, ptr<const uint8_t>(packed),
                                    ptr<const float>(scales), ptr<const int32_t>(zeros),
                                    ptr<const float>(bias), n, k, group, mode, ptr<int8_t>(xq),
                                    ptr<float>(dx), ptr<float>(xs), ptr<int>(bad),
                                    ptr<float>(y), path, reverse);
        },
        arg("x"), arg("m"), arg("packed"), arg("scales"), arg("zeros"), arg("bias"), arg("n"),
        arg("k"), arg("group"), arg("mode"), arg("xq"), arg("dx"), arg("xs"), arg("bad"),
        arg("y"), arg("path"), arg("reverse"), nogil);

  m.def("gemm_lut4",
        [](Addr x, int64_t mrows, Addr packed, Addr scales, Addr table, Addr bias, int64_t n,
           int64_t k, int64_t group, Addr y, int path, int device, Addr stream) {
          check_shapes(qk::cuda::gemm_lut4_check(mrows, n, k, group, path));
          DeviceGuard guard(device, "gemm_lut4");
          check(qk::cuda::gemm_lut4(ptr<const float>(x), mrows, ptr<const uint8_t>(packed),
                                    ptr<const float>(scales), ptr<const float>(table),
                                    ptr<const float>(bias), n, k, group, ptr<float>(y), path,
                                    stream_of(stream)),
                "gemm_lut4");
        },
        arg("x"), arg("m"), arg("packed"), arg("scales"), arg("table"), arg("bias"), arg("n"),
        arg("k"), arg("group"), arg("y"), arg("path"), arg("device"), arg("stream"), nogil);
  m.def("emulate_gemm_lut4",
        [](Addr x, int64_t mrows, Addr packed, Addr scales, Addr table, Addr bias, int64_t n,
           int64_t k, int64_t group, Addr y, int path, bool reverse) {
          qk::cuda::emulate_gemm_lut4(ptr<const float>(x), mrows, ptr<const uint8_t>(packed),
                                      ptr<const float>(scales), ptr<const float>(table),
                                      ptr<const float>(bias), n, k, group, ptr<float>(y), path,
                                      reverse);
        },
        arg("x"), arg("m"), arg("packed"), arg("scales"), arg("table"), arg("bias"), arg("n"),
        arg("k"), arg("group"), arg("y"), arg("path"), arg("reverse"), nogil);

  m.def("gemm_w8a8",
        [](Addr x, int64_t mrows, Addr packed, Addr w_scale, Addr bias, int64_t n, int64_t k,
           Addr xq, Addr sx, Addr bad, Addr y, int path, int device, Addr stream) {
          check_shapes(qk::cuda::gemm_w8_check(mrows, n, k, true, path));
          DeviceGuard guard(device, "gemm_w8a8");
          check(qk::cuda::gemm_w8a8(ptr<const float>(x), mrows, ptr<const int8_t>(packed),
                                    ptr<const float>(w_scale), ptr<const float>(bias), n, k,
                                    ptr<int8_t>(xq), ptr<float>(sx), ptr<int>(bad),
                                    ptr<float>(y), path, stream_of(stream)),
                "gemm_w8a8");
        },
        arg("x"), arg("m"), arg("packed"), arg("w_scale"), arg("bias"), arg("n"), arg("k"),
        arg("xq"), arg("sx"), arg("bad"), arg("y"), arg("path"), arg("device"), arg("stream"),
        nogil);
  m.def("emulate_gemm_w8a8",
        [](Addr x, int64_t mrows, Addr packed, Addr w_scale, Addr bias, int64_t n, int64_t k,
           Addr xq, Addr sx, Addr bad, Addr y, int path, bool reverse) {
          qk::cuda::emulate_gemm_w8a8(ptr<const float>(x), mrows, ptr<const int8_t>(packed),
                                      ptr<const float>(w_scale), ptr<const float>(bias), n, k,
                                      ptr<int8_t>(xq), ptr<float>(sx), ptr<int>(bad),
                                      ptr<float>(y), path, reverse);
        },
        arg("x"), arg("m"), arg("packed"), arg("w_scale"), arg("bias"), arg("n"), arg("k"),
        arg("xq"), arg("sx"), arg("bad"), arg("y"), arg("path"), arg("reverse"), nogil);

  m.def("gemm_w8a16",
        [](Addr x, int64_t mrows, Addr packed, Addr w_scale, Addr bias, int64_t n, int64_t k,
           Addr y, int path, int device, Addr stream) {
          check_shapes(qk::cuda::gemm_w8_check(mrows, n, k, false, path));
          DeviceGuard guard(device, "gemm_w8a16");
          check(qk::cuda::gemm_w8a16(ptr<const float>(x), mrows, ptr<const int8_t>(packed),
                                     ptr<const float>(w_scale), ptr<const float>(bias), n, k,
                                     ptr<float>(y), path, stream_of(stream)),
                "gemm_w8a16");
        },
        arg("x"), arg("m"), arg("packed"), arg("w_scale"), arg("bias"), arg("n"), arg("k"),
        arg("y"), arg("path"), arg("device"), arg("stream"), nogil);
  m.def("emulate_gemm_w8a16",
        [](Addr x, int64_t mrows, Addr packed, Addr w_scale, Addr bias, int64_t n, int64_t k,
           Addr y, int path, bool reverse) {
          qk::cuda::emulate_gemm_w8a16(ptr<const float>(x), mrows, ptr<const int8_t>(packed),
                                       ptr<const float>(w_scale), ptr<const float>(bias), n, k,
                                       ptr<float>(y), path, reverse);
        },
        arg("x"), arg("m"), arg("packed"), arg("w_scale"), arg("bias"), arg("n"), arg("k"),
        arg("y"), arg("path"), arg("reverse"), nogil);
  // ---- core/matmul.h on the host, for tests of the device helpers' rules ------------------------
  auto mmh = m.def_submodule("host_mm", "csrc/core/matmul.h helpers called on the host");
  mmh.def("float_of_small_uint", &qk::mm::float_of_small_uint, arg("u"));
  mmh.def("float_of_s8", &qk::mm::float_of_s8, arg("word"), arg("t"));
  mmh.def("w4_nibble", &qk::mm::w4_nibble, arg("word"), arg("c"));
  mmh.def("w4_low_nibbles", &qk::mm::w4_low_nibbles, arg("word"));
  mmh.def("w4_high_nibbles", &qk::mm::w4_high_nibbles, arg("word"));
  mmh.def("lut4_code", &qk::mm::lut4_code, arg("word"), arg("j"));
  mmh.def("dot4_s8", &qk::mm::dot4_s8, arg("a"), arg("b"), arg("c"));
  mmh.def("w4_block_dot", &qk::mm::w4_block_dot, arg("du"), arg("zc"), arg("xs"));
  // One fast-mode activation block (any length; the kernels use 32): (codes, d, code sum).
  mmh.def("w4_quantize_block", [](const std::vector<float>& x) {
    float amax = 0.0f;
    bool bad = false;
    for (float v : x) amax = qk::mm::w4_amax_step(amax, v, &bad);
    const float d = qk::mm::w4_block_scale(amax, bad);
    std::vector<int32_t> codes(x.size(), 0);
    int32_t sum = 0;
    if (qk::mm::w4_block_live(d)) {
      const float r = 1.0f / d;
      for (size_t j = 0; j < x.size(); ++j) sum += codes[j] = qk::mm::w4_act_code(x[j], r);
    }
    return py::make_tuple(codes, d, sum);
  }, arg("x"));
  // One W8A8 activation row: (codes, scale).
  mmh.def("w8a8_row", [](const std::vector<float>& x) {
    float amax = 0.0f;
    bool bad = false;
    for (float v : x) amax = qk::mm::w4_amax_step(amax, v, &bad);
    const float scale = qk::mm::w8a8_row_scale(amax);
    std::vector<int32_t> codes;
    for (float v : x) codes.push_back(qk::mm::w8a8_act_code(v, scale));
    return py::make_tuple(codes, scale);
  }, arg("x"));
  mmh.def("w8a8_value", [](int32_t acc, float sx, float sw, std::optional<float> bias) {
    const float b = bias ? *bias : 0.0f;
    return qk::mm::w8a8_value(acc, sx, sw, bias ? &b : nullptr, 0);
  }, arg("acc"), arg("sx"), arg("sw"), arg("bias"));
}
