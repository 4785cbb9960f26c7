// The execution model of the CUDA matmul kernels (gemm.cuh), written so that the host can run
// them too, and the checked memory accesses they use. The kernel bodies are per family:
// gemm_w4_body.cuh, gemm_lut4_body.cuh, gemm_w8_body.cuh.
//
// A kernel here is a struct with a Ctx (its arguments, trivially copyable), a per-thread
// State (registers) and `step(ctx, block, tid, s, state, smem)`: the work of one thread
// between two barriers. The device driver (gemm.cu) runs steps 0 .. num_steps-1 with
// __syncthreads() after each; steps for which is_reduce() holds are warp all-reductions of
// State::red by __shfl_xor_sync butterflies (offsets 16 .. kRedMinOff) with combine().
// The host emulator runs the same steps thread by thread (forward or reverse thread order,
// so a read of shared data written in the same step shows up as a difference), does the
// butterflies lane by lane in the same order, and checks every global and shared access
// against its buffer (QK_EMU_CHECK; compiled out on the device). The numeric rules are the
// QK_HD functions of core/matmul.h, so the CPU tests of the emulation cover the device math
// except the intrinsics (__dp4a, __shfl_xor_sync, __ldg) and the launch itself.
//
// All blocks have kThreads = 256 threads; all grids are 1-D.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/matmul.h"

namespace qk {
namespace cuda {
namespace gemm {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGemvMaxM = 8;  // rows of x per GEMV launch (more rows: GEMM, or row chunks)

#if defined(__CUDA_ARCH__)
#define QK_EMU_CHECK(cond) ((void)0)
#else
[[noreturn]] void emu_fail(const char* what, const char* file, int line);  // gemm.cu: throws
#define QK_EMU_CHECK(cond) \
  ((cond) ? (void)0 : ::qk::cuda::gemm::emu_fail(#cond, __FILE__, __LINE__))
#endif

// ---- checked memory access ---------------------------------------------------------------------

// Element i of a read-only global array of n elements.
template <class T>
QK_HD T ld(const T* p, int64_t i, int64_t n) {
  QK_EMU_CHECK(p != nullptr && i >= 0 && i < n);
#if defined(__CUDA_ARCH__)
  return __ldg(p + i);
#else
  return p[i];
#endif
}

// A vector V (uint4, float4, uint32_t) at byte offset `off` of a read-only global buffer of
// `nbytes` bytes; the address must be a multiple of sizeof(V).
template <class V>
QK_HD V ldv(const void* base, int64_t off, int64_t nbytes) {
  const char* p = static_cast<const char*>(base) + off;
  QK_EMU_CHECK(base != nullptr && off >= 0 && off + static_cast<int64_t>(sizeof(V)) <= nbytes);
  QK_EMU_CHECK(reinterpret_cast<uintptr_t>(p) % sizeof(V) == 0);
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const V*>(p));
#else
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
#endif
}

template <class T>
QK_HD void st(T* p, int64_t i, int64_t n, T v) {
  QK_EMU_CHECK(p != nullptr && i >= 0 && i < n);
  p[i] = v;
}

template <class V>
QK_HD void stv(void* base, int64_t off, int64_t nbytes, const V& v) {
  char* p = static_cast<char*>(base) + off;
  QK_EMU_CHECK(base != nullptr && off >= 0 && off + static_cast<int64_t>(sizeof(V)) <= nbytes);
  QK_EMU_CHECK(reinterpret_cast<uintptr_t>(p) % sizeof(V) == 0);
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<V*>(p) = v;
#else
  std::memcpy(p, &v, sizeof(V));
#endif
}

// A region of shared memory: n elements of T.
template <class T>
struct Sm {
  T* p;
  int n;
  QK_HD T& operator[](int i) const {
    QK_EMU_CHECK(i >= 0 && i < n);
    return p[i];
  }
  // Vector V at element i (i a multiple of the vector width).
  template <class V>
  QK_HD V vec(int i) const {
    QK_EMU_CHECK(i >= 0 && i + static_cast<int>(sizeof(V) / sizeof(T)) <= n &&
                 i % static_cast<int>(sizeof(V) / sizeof(T)) == 0);
#if defined(__CUDA_ARCH__)
    return *reinterpret_cast<const V*>(p + i);
#else
    V v;
    std::memcpy(&v, p + i, sizeof(V));
    return v;
#endif
  }
};

// Carves 16-byte aligned regions off the dynamic shared memory, in order.
struct Carver {
  unsigned char* p;
  template <class T>
  QK_HD Sm<T> take(int n) {
    Sm<T> r{reinterpret_cast<T*>(p), n};
    p += (static_cast<size_t>(n) * sizeof(T) + 15) / 16 * 16;
    return r;
  }
};
template <class T>
constexpr size_t region_bytes(int n) {
  return (static_cast<size_t>(n) * sizeof(T) + 15) / 16 * 16;
}

// Component r (0..3) of a 4-vector; r is a constant after unrolling.
template <class V>
QK_HD auto comp(const V& v, int r) -> decltype(v.x) {
  return r == 0 ? v.x : r == 1 ? v.y : r == 2 ? v.z : v.w;
}

// For kernels without warp reductions.
struct NoReduce {
  static constexpr int kRed = 1;
  static constexpr int kRedMinOff = 32;
  using Red = float;
  QK_HD static Red combine(Red a, Red) { return a; }
  template <class Ctx>
  QK_HD static bool is_reduce(const Ctx&, int) { return false; }
};

}  // namespace gemm
}  // namespace cuda
}  // namespace qk
