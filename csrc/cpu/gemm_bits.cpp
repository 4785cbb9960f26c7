// Entry points of the binary / ternary matmuls: activation preparation (padding, or sign bits
// and beta for XNOR), ISA choice, and the split over the thread pool.
#include <algorithm>
#include <vector>

#include "cpu/gemm_bits.h"
#include "cpu/impl.h"
#include "cpu/threadpool.h"

namespace qk {
namespace {

// Below this many weight-activation products a call runs on the calling thread.
constexpr int64_t kMinParallelWork = int64_t{1} << 18;

const bits::Kernels& kernels() {
  if (active_isa() == kIsaAvx2) {
    const bits::Kernels* k = bits::avx2_kernels();
    if (k) return *k;
  }
  return bits::kScalarKernels;
}

// Calls body(m0, m1, n0, n1) over a 2-D split of the (M, N) output: output channels first
// (each weight row is read once per block of M), activation rows when N alone is too few.
template <typename F>
void split_mn(int64_t M, int64_t N, int64_t K, F body) {
  const int threads = pool_threads();
  if (threads == 1 || M * N * K < kMinParallelWork) {
    body(int64_t{0}, M, int64_t{0}, N);
    return;
  }
  const int64_t want = 4 * static_cast<int64_t>(threads);
  int64_t nb = std::max<int64_t>(1, (N + want - 1) / want);
  int64_t n_chunks = (N + nb - 1) / nb;
  int64_t m_chunks = 1, mb = M;
  if (n_chunks < want && M > 4) {
    m_chunks = std::min<int64_t>((want + n_chunks - 1) / n_chunks, (M + 3) / 4);
    mb = ((M + m_chunks - 1) / m_chunks + 3) / 4 * 4;  // multiples of the 4-row tiles
    m_chunks = (M + mb - 1) / mb;
  }
  parallel_for(n_chunks * m_chunks, [&](int64_t c) {
    int64_t mc = c / n_chunks, nc = c % n_chunks;
    int64_t m0 = mc * mb, n0 = nc * nb;
    body(m0, std::min(M, m0 + mb), n0, std::min(N, n0 + nb));
  });
}

// x padded with zeros to 64*KW columns (x itself when K is a multiple of 64).
const float* padded(const float* x, int64_t M, int64_t K, std::vector<float>* buf) {
  const int64_t Kp = 64 * bits_words(K);
  if (Kp == K) return x;
  buf->assign(static_cast<size_t>(M * Kp), 0.0f);
  for (int64_t m = 0; m < M; ++m) std::copy(x + m * K, x + (m + 1) * K, buf->data() + m * Kp);
  return buf->data();
}

void gemm_float(bool ternary, const float* x, int64_t M, const uint8_t* w, const float* alpha,
                const float* bias, int64_t N, int64_t K, float* y) {
  const int64_t KW = bits_words(K), Kp = 64 * KW;
  std::vector<float> buf;
  const float* xp = padded(x, M, K, &buf);
  const bits::Kernels& k = kernels();
  auto fn = ternary ? k.ternary_f32 : k.binary_f32;
  split_mn(M, N, K, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    fn(xp + m0 * Kp, m1 - m0, KW, w, alpha, bias, n0, n1, N, y + m0 * N);
  });
}

}  // namespace

void gemm_binary(const float* x, int64_t M, const uint8_t* wbits, const float* alpha,
                 const float* bias, int64_t N, int64_t K, bool xnor, float* y) {
  if (M <= 0 || N <= 0) return;
  if (!xnor) {
    gemm_float(false, x, M, wbits, alpha, bias, N, K, y);
    return;
  }
  const int64_t KW = bits_words(K);
  std::vector<uint64_t> xb(static_cast<size_t>(M * KW), 0);
  std::vector<float> beta(static_cast<size_t>(M));
  auto prep = [&](int64_t m) {
    const float* xr = x + m * K;
    uint64_t* br = xb.data() + m * KW;
    for (int64_t k = 0; k < K; ++k) br[k >> 6] |= static_cast<uint64_t>(xr[k] < 0.0f) << (k & 63);
    beta[m] = K > 0 ? static_cast<float>(impl::sum_abs(xr, K) / static_cast<double>(K)) : 0.0f;
  };
  if (pool_threads() > 1 && M * K >= kMinParallelWork) parallel_for(M, prep);
  else for (int64_t m = 0; m < M; ++m) prep(m);
  const bits::Kernels& k = kernels();
  split_mn(M, N, K, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    k.xnor(xb.data() + m0 * KW, beta.data() + m0, m1 - m0, K, wbits, alpha, bias, n0, n1, N,
           y + m0 * N);
  });
}

void gemm_ternary(const float* x, int64_t M, const uint8_t* wpacked, const float* alpha,
                  const float* bias, int64_t N, int64_t K, float* y) {
  if (M <= 0 || N <= 0) return;
  gemm_float(true, x, M, wpacked, alpha, bias, N, K, y);
}

}  // namespace qk
