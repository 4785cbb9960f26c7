// Scalar 2-bit / 3-bit matmul kernels: the executable form of docs/numerics.md "2-bit and
// 3-bit group-wise matmul", element by element. The AVX2 kernels perform the same float32
// operations in the same order (FMA included, via std::fma here), so both paths give
// identical bits.
#include "cpu/gemm/tile/ref.h"
#include "cpu/gemm/w23/kernels.h"

namespace qk {
namespace w23 {
namespace {

// zc = float(-qmin) + float(z): u - zc = q - z (exact for codes and zero points in range).
struct Offset {
  const Problem& p;
  float operator()(int64_t pidx) const {
    if (p.zeros_f) return p.zeros_f[pidx];
    return p.zc0 + (p.zeros ? static_cast<float>(p.zeros[pidx]) : 0.0f);
  }
};

struct Code {
  const Problem& p;
  int operator()(int64_t n, int64_t k) const { return w23_code(p.packed, p.bits, p.k, n, k); }
};

void exact_scalar(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  tile_ref::exact<kW23Rows>(p, t0, t1, m0, m1, Code{p}, Offset{p});
}

void fast_scalar(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t m1) {
  tile_ref::fast<kW23Rows, kW23Block>(p, t0, t1, m0, m1, Code{p}, Offset{p});
}

}  // namespace

const Kernels kScalarKernels = {fast_scalar, exact_scalar, nullptr};

}  // namespace w23
}  // namespace qk
