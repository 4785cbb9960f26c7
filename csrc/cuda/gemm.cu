// Launch sequences of the CUDA matmuls (gemm.cuh): argument checks, the choice between GEMV
// and GEMM kernels, and two executors of the kernel bodies (gemm_*_body.cuh): the device (one
// __global__ driver running the steps with barriers) and the host emulator (thread by thread).
// The launch sequence is written once, over the executor, so the emulation runs exactly the
// shapes, pointer offsets and grids that the device gets.
#include "cuda/gemm.cuh"

#include <climits>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/gemm_body.cuh"
#include "cuda/gemm_lut4_body.cuh"
#include "cuda/gemm_w4_body.cuh"
#include "cuda/gemm_w8_body.cuh"

namespace qk {
namespace cuda {
namespace gemm {

[[noreturn]] void emu_fail(const char* what, const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  throw std::runtime_error(std::string("qkern CUDA emulation: ") + (base ? base + 1 : file) +
                           ":" + std::to_string(line) + ": check failed: " + what);
}

namespace {

template <class K>
__global__ void __launch_bounds__(kThreads) step_kernel(const typename K::Ctx c) {
  extern __shared__ float4 qk_gemm_smem[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(qk_gemm_smem);
  typename K::State state{};
  const int64_t block = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const int steps = K::num_steps(c);
  for (int s = 0; s < steps; ++s) {
    if (K::is_reduce(c, s)) {
#pragma unroll
      for (int j = 0; j < K::kRed; ++j)
#pragma unroll
        for (int off = 16; off >= K::kRedMinOff; off >>= 1)
          state.red[j] = K::combine(state.red[j], __shfl_xor_sync(0xffffffffu, state.red[j], off));
    } else {
      K::step(c, block, tid, s, state, smem);
    }
    __syncthreads();
  }
}

struct DeviceExec {
  cudaStream_t stream;

  template <class K>
  cudaError_t run(const typename K::Ctx& c) {
    const int64_t blocks = K::blocks(c);
    if (blocks <= 0) return cudaSuccess;
    if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    step_kernel<K><<<static_cast<unsigned>(blocks), kThreads, K::smem_bytes(c), stream>>>(c);
    return cudaGetLastError();
  }
  cudaError_t zero(void* p, size_t bytes) { return cudaMemsetAsync(p, 0, bytes, stream); }
};

// Warp all-reduction of State::red, lane by lane, in the device's butterfly order.
template <class K>
void emulate_reduce(std::vector<typename K::State>& state) {
  using Red = typename K::Red;
  for (int w = 0; w < kWarps; ++w) {
    for (int off = 16; off >= K::kRedMinOff; off >>= 1) {
      Red tmp[32][K::kRed];
      for (int l = 0; l < 32; ++l)
        for (int j = 0; j < K::kRed; ++j)
          tmp[l][j] = K::combine(state[w * 32 + l].red[j], state[w * 32 + (l ^ off)].red[j]);
      for (int l = 0; l < 32; ++l)
        for (int j = 0; j < K::kRed; ++j) state[w * 32 + l].red[j] = tmp[l][j];
    }
  }
}

struct HostExec {
  bool reverse;

  template <class K>
  cudaError_t run(const typename K::Ctx& c) {
    const int64_t blocks = K::blocks(c);
    if (blocks <= 0) return cudaSuccess;
    if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    const size_t bytes = K::smem_bytes(c);
    constexpr size_t kGuard = 64;
    std::vector<float4> buf((bytes + kGuard) / sizeof(float4) + 1);
    unsigned char* smem = reinterpret_cast<unsigned char*>(buf.data());
    std::vector<typename K::State> state(kThreads);
    const int steps = K::num_steps(c);
    for (int64_t b = 0; b < blocks; ++b) {
      std::memset(smem, 0xFF, bytes);  // NaN floats, -1 ints: reads of unwritten data show
      std::memset(smem + bytes, 0xA5, kGuard);
      for (auto& st : state) st = typename K::State{};
      for (int s = 0; s < steps; ++s) {
        if (K::is_reduce(c, s)) {
          emulate_reduce<K>(state);
          continue;
        }
        for (int i = 0; i < kThreads; ++i) {
          const int tid = reverse ? kThreads - 1 - i : i;
          K::step(c, b, tid, s, state[tid], smem);
        }
      }
      for (size_t i = 0; i < kGuard; ++i)
        if (smem[bytes + i] != 0xA5) emu_fail("shared memory guard intact", __FILE__, __LINE__);
    }
    return cudaSuccess;
  }
  cudaError_t zero(void* p, size_t bytes) {
    std::memset(p, 0, bytes);
    return cudaSuccess;
  }
};

bool aligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

#define QK_TRY(...)                             \
  do {                                          \
    const cudaError_t qk_err_ = (__VA_ARGS__);  \
    if (qk_err_ != cudaSuccess) return qk_err_; \
  } while (0)

bool use_gemv(int path, int64_t m) { return path == 1 || (path == 0 && m <= kGemvMaxM); }

// ---- int4 -------------------------------------------------------------------------------------

W4Ctx w4_ctx(const float* x, int64_t m, const uint8_t* packed, const float* scales,
             const int32_t* zeros, const float* bias, int64_t n, int64_t k, int64_t group,
             const int8_t* xq, const float* dx, const float* xs, int* bad, float* y) {
  W4Ctx c{};
  c.x = x;
  c.packed = packed;
  c.scales = scales;
  c.zeros = zeros;
  c.bias = bias;
  c.y = y;
  c.xq = xq;
  c.dx = dx;
  c.xs = xs;
  c.bad = bad;
  c.m = m;
  c.n = n;
  c.k = k;
  c.group = group;
  c.nb = k / 32;
  c.ng = k / group;
  c.bpg = group / 32;
  c.ntiles = (n + 7) / 8;
  // GEMV: enough groups per chunk to give every thread one (4 .. 64), the rest of the 256
  // threads over half tiles.
  int gc = 4;
  while (gc < c.ng && gc < 64) gc *= 2;
  c.gc = gc;
  c.rows_pb = 1024 / gc;
  c.nchunks = static_cast<int>((c.ng + gc - 1) / gc);
  c.nbm = (m + 63) / 64;
  return c;
}

template <bool FAST, class Exec>
cudaError_t w4_gemv_rows(Exec& ex, const W4Ctx& c) {
  for (int64_t m0 = 0; m0 < c.m; m0 += kGemvMaxM) {
    W4Ctx s = c;
    s.m = c.m - m0 < kGemvMaxM ? c.m - m0 : kGemvMaxM;
    s.x = c.x + m0 * c.k;
    s.y = c.y + m0 * c.n;
    if (FAST) {
      s.xq = c.xq + m0 * c.k;
      s.dx = c.dx + m0 * c.nb;
      s.xs = c.xs + m0 * c.nb;
    }
    s.nbm = 1;
    QK_TRY(s.m == 1 ? ex.template run<W4Gemv<1, FAST>>(s) : ex.template run<W4Gemv<8, FAST>>(s));
  }
  return cudaSuccess;
}

template <class Exec>
cudaError_t run_w4(Exec& ex, const W4Ctx& c, int mode, int path) {
  if (mode == 1) {
    if (!c.bad || !aligned(c.bad, 4)) return cudaErrorInvalidValue;
    QK_TRY(ex.zero(c.bad, sizeof(int)));
  }
  if (c.m == 0 || c.n == 0) return cudaSuccess;
  if (!aligned(c.x, 16) || !aligned(c.packed, 16) || !aligned(c.scales, 16) ||
      !aligned(c.zeros, 4) || !aligned(c.bias, 4) || !aligned(c.y, 4))
    return cudaErrorMisalignedAddress;
  if (mode == 1) {
    if (!c.xq || !c.dx || !c.xs) return cudaErrorInvalidValue;
    if (!aligned(c.xq, 16) || !aligned(c.dx, 4) || !aligned(c.xs, 4))
      return cudaErrorMisalignedAddress;
    QK_TRY(ex.template run<W4QuantX>(c));
  }
  if (use_gemv(path, c.m))
    return mode == 1 ? w4_gemv_rows<true>(ex, c) : w4_gemv_rows<false>(ex, c);
  return mode == 1 ? ex.template run<W4Gemm<true>>(c) : ex.template run<W4Gemm<false>>(c);
}

// ---- lookup table ------------------------------------------------------------------------------

Lut4Ctx lut4_ctx(const float* x, int64_t m, const uint8_t* packed, const float* scales,
                 const float* table16, const float* bias, int64_t n, int64_t k, int64_t group,
                 float* y) {
  Lut4Ctx c{};
  c.x = x;
  c.packed = packed;
  c.scales = scales;
  c.table = table16;
  c.bias = bias;
  c.y = y;
  c.m = m;
  c.n = n;
  c.k = k;
  c.group = group;
  c.ng = k / group;
  c.nbm = (m + 63) / 64;
  return c;
}

template <class Exec>
cudaError_t run_lut4(Exec& ex, const Lut4Ctx& c, int path) {
  if (c.m == 0 || c.n == 0) return cudaSuccess;
  if (!aligned(c.x, 16) || !aligned(c.packed, 16) || !aligned(c.scales, 4) ||
      !aligned(c.table, 4) || !aligned(c.bias, 4) || !aligned(c.y, 4))
    return cudaErrorMisalignedAddress;
  if (!use_gemv(path, c.m)) return ex.template run<Lut4Gemm>(c);
  for (int64_t m0 = 0; m0 < c.m; m0 += kGemvMaxM) {
    Lut4Ctx s = c;
    s.m = c.m - m0 < kGemvMaxM ? c.m - m0 : kGemvMaxM;
    s.x = c.x + m0 * c.k;
    s.y = c.y + m0 * c.n;
    s.nbm = 1;
    QK_TRY(s.m == 1 ? ex.template run<Lut4Gemv<1>>(s) : ex.template run<Lut4Gemv<8>>(s));
  }
  return cudaSuccess;
}

// ---- int8 weights ------------------------------------------------------------------------------

W8Ctx w8_ctx(const float* x, int64_t m, const int8_t* packed, const float* w_scale,
             const float* bias, int64_t n, int64_t k, int8_t* xq, float* sx, int* bad, float* y) {
  W8Ctx c{};
  c.x = x;
  c.xq = xq;
  c.sx = sx;
  c.bad = bad;
  c.packed = packed;
  c.w_scale = w_scale;
  c.bias = bias;
  c.y = y;
  c.m = m;
  c.n = n;
  c.k = k;
  c.kp = (k + 3) / 4 * 4;
  c.nblk = (n + 15) / 16;
  c.nbm = (m + 63) / 64;
  c.x_vec = k % 4 == 0 && aligned(x, 16);
  return c;
}

template <bool A8, class Exec>
cudaError_t run_w8(Exec& ex, W8Ctx c, int path) {
  if (A8) {
    if (!c.bad || !aligned(c.bad, 4)) return cudaErrorInvalidValue;
    QK_TRY(ex.zero(c.bad, sizeof(int)));
  }
  if (c.m == 0 || c.n == 0) return cudaSuccess;
  if (!aligned(c.x, 4) || !aligned(c.packed, 16) || !aligned(c.w_scale, 4) ||
      !aligned(c.bias, 4) || !aligned(c.y, 4))
    return cudaErrorMisalignedAddress;
  if (A8) {
    if ((!c.xq && c.kp > 0) || !c.sx) return cudaErrorInvalidValue;
    if (!aligned(c.xq, 16) || !aligned(c.sx, 4)) return cudaErrorMisalignedAddress;
    QK_TRY(ex.template run<W8QuantRows>(c));
  }
  if (!use_gemv(path, c.m)) return ex.template run<W8Gemm<A8>>(c);
  for (int64_t m0 = 0; m0 < c.m; m0 += kGemvMaxM) {
    W8Ctx s = c;
    s.m = c.m - m0 < kGemvMaxM ? c.m - m0 : kGemvMaxM;
    s.x = c.x + m0 * c.k;
    s.y = c.y + m0 * c.n;
    if (A8) {
      s.xq = c.xq + m0 * c.kp;
      s.sx = c.sx + m0;
    }
    s.x_vec = c.k % 4 == 0 && aligned(s.x, 16);
    s.nbm = 1;
    QK_TRY(s.m == 1 ? ex.template run<W8Gemv<1, A8>>(s) : ex.template run<W8Gemv<8, A8>>(s));
  }
  return cudaSuccess;
}

// Host emulation: argument errors become exceptions.
void emu_throw(const char* msg, cudaError_t err) {
  if (msg) throw std::invalid_argument(msg);
  if (err == cudaErrorMisalignedAddress)
    throw std::invalid_argument(
        "qkern CUDA emulation: a vector-loaded buffer is not 16-byte aligned");
  if (err != cudaSuccess)
    throw std::invalid_argument(std::string("qkern CUDA emulation: invalid launch (error ") +
                                std::to_string(static_cast<int>(err)) + ")");
}

const char* check_path(int path) {
  return path < 0 || path > 2 ? "path must be 0 (auto), 1 (GEMV kernels) or 2 (GEMM kernels)"
                              : nullptr;
}

}  // namespace
}  // namespace gemm

using gemm::DeviceExec;
using gemm::HostExec;

const char* gemm_w4_check(int64_t m, int64_t n, int64_t k, int64_t group, int mode, int path) {
  if (m < 0 || n < 0) return "gemm_w4: M and N must be >= 0";
  if (group <= 0 || group % 32 != 0) return "gemm_w4: group_size must be a positive multiple of 32";
  if (k <= 0 || k % group != 0) return "gemm_w4: K must be a positive multiple of group_size";
  if (mode != 0 && mode != 1) return "gemm_w4: mode must be 0 (exact) or 1 (fast)";
  if (k / 32 > (INT_MAX - 2) / 2) return "gemm_w4: K is too large";
  return gemm::check_path(path);
}

const char* gemm_lut4_check(int64_t m, int64_t n, int64_t k, int64_t group, int path) {
  if (m < 0 || n < 0) return "gemm_lut4: M and N must be >= 0";
  if (group <= 0 || group % 32 != 0)
    return "gemm_lut4: the CUDA kernels need group_size a positive multiple of 32 (32, 64, 128)";
  if (k <= 0 || k % group != 0) return "gemm_lut4: K must be a positive multiple of group_size";
  if (k / 32 > (INT_MAX - 2) / 2) return "gemm_lut4: K is too large";
  return gemm::check_path(path);
}

const char* gemm_w8_check(int64_t m, int64_t n, int64_t k, bool a8, int path) {
  if (m < 0 || n < 0 || k < 0) return "gemm_w8: M, N and K must be >= 0";
  if (a8 && k > mm::kW8A8MaxK)
    return "gemm_w8a8: K exceeds 132104, the largest K whose int32 accumulation cannot overflow";
  if (k / 32 > (INT_MAX - 2) / 2) return "gemm_w8: K is too large";
  return gemm::check_path(path);
}

cudaError_t gemm_w4(const float* x, int64_t m, const uint8_t* packed, const float* scales,
                    const int32_t* zeros, const float* bias, int64_t n, int64_t k, int64_t group,
                    int mode, int8_t* xq, float* dx, float* xs, int* bad, float* y, int path,
                    cudaStream_t stream) {
  if (gemm_w4_check(m, n, k, group, mode, path)) return cudaErrorInvalidValue;
  DeviceExec ex{stream};
  return gemm::run_w4(ex, gemm::w4_ctx(x, m, packed, scales, zeros, bias, n, k, group, xq, dx,
                                       xs, bad, y),
                      mode, path);
}

cudaError_t gemm_lut4(const float* x, int64_t m, const uint8_t* packed, const float* scales,
                      const float* table16, const float* bias, int64_t n, int64_t k,
                      int64_t group, float* y, int path, cudaStream_t stream) {
  if (gemm_lut4_check(m, n, k, group, path)) return cudaErrorInvalidValue;
  DeviceExec ex{stream};
  return gemm::run_lut4(ex, gemm::lut4_ctx(x, m, packed, scales, table16, bias, n, k, group, y),
                        path);
}

cudaError_t gemm_w8a8(const float* x, int64_t m, const int8_t* packed, const float* w_scale,
                      const float* bias, int64_t n, int64_t k, int8_t* xq, float* sx, int* bad,
                      float* y, int path, cudaStream_t stream) {
  if (gemm_w8_check(m, n, k, true, path)) return cudaErrorInvalidValue;
  DeviceExec ex{stream};
  return gemm::run_w8<true>(ex, gemm::w8_ctx(x, m, packed, w_scale, bias, n, k, xq, sx, bad, y),
                            path);
}

cudaError_t gemm_w8a16(const float* x, int64_t m, const int8_t* packed, const float* w_scale,
                       const float* bias, int64_t n, int64_t k, float* y, int path,
                       cudaStream_t stream) {
  if (gemm_w8_check(m, n, k, false, path)) return cudaErrorInvalidValue;
  DeviceExec ex{stream};
  return gemm::run_w8<false>(
      ex, gemm::w8_ctx(x, m, packed, w_scale, bias, n, k, nullptr, nullptr, nullptr, y), path);
}

void emulate_gemm_w4(const float* x, int64_t m, const uint8_t* packed, const float* scales,
                     const int32_t* zeros, const float* bias, int64_t n, int64_t k, int64_t group,
                     int mode, int8_t* xq, float* dx, float* xs, int* bad, float* y, int path,
                     bool reverse) {
  gemm::emu_throw(gemm_w4_check(m, n, k, group, mode, path), cudaSuccess);
  HostExec ex{reverse};
  gemm::emu_throw(nullptr, gemm::run_w4(ex, gemm::w4_ctx(x, m, packed, scales, zeros, bias, n,
                                                         k, group, xq, dx, xs, bad, y),
                                        mode, path));
}

void emulate_gemm_lut4(const float* x, int64_t m, const uint8_t* packed, const float* scales,
                       const float* table16, const float* bias, int64_t n, int64_t k,
                       int64_t group, float* y, int path, bool reverse) {
  gemm::emu_throw(gemm_lut4_check(m, n, k, group, path), cudaSuccess);
  HostExec ex{reverse};
  gemm::emu_throw(nullptr, gemm::run_lut4(ex, gemm::lut4_ctx(x, m, packed, scales, table16,
                                                             bias, n, k, group, y),
                                          path));
}

void emulate_gemm_w8a8(const float* x, int64_t m, const int8_t* packed, const float* w_scale,
                       const float* bias, int64_t n, int64_t k, int8_t* xq, float* sx, int* bad,
                       float* y, int path, bool reverse) {
  gemm::emu_throw(gemm_w8_check(m, n, k, true, path), cudaSuccess);
  HostExec ex{reverse};
  gemm::emu_throw(nullptr, gemm::run_w8<true>(ex, gemm::w8_ctx(x, m, packed, w_scale, bias, n,
                                                               k, xq, sx, bad, y),
                                              path));
}

void emulate_gemm_w8a16(const float* x, int64_t m, const int8_t* packed, const float* w_scale,
                        const float* bias, int64_t n, int64_t k, float* y, int path,
                        bool reverse) {
  gemm::emu_throw(gemm_w8_check(m, n, k, false, path), cudaSuccess);
  HostExec ex{reverse};
  gemm::emu_throw(nullptr, gemm::run_w8<false>(ex, gemm::w8_ctx(x, m, packed, w_scale, bias, n,
                                                                k, nullptr, nullptr, nullptr, y),
                                               path));
}

}  // namespace cuda
}  // namespace qk
