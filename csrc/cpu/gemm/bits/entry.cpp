// Entry points of the binary / ternary matmuls: packing, activation preparation (lookup
// tables, or sign words and beta for XNOR), ISA choice, and the split over the thread pool.
#include <algorithm>
#include <vector>

#include "cpu/gemm/bits/kernels.h"
#include "cpu/quant/kernels.h"
#include "cpu/runtime/threadpool.h"

namespace qk {
namespace {

// Below this many weight-activation products a call runs on the calling thread.
constexpr int64_t kMinParallelWork = int64_t{1} << 18;
// Tables of at most this many floats (4 MiB) are built at a time; longer batches of
// activation rows are done in panels.
constexpr int64_t kTableBudget = int64_t{1} << 20;

void store_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

// Packs one plane: bit(n, k) -> 1 or 0, or -1 for a code out of range.
template <typename Bit>
bool pack_plane(int64_t N, int64_t K, bool ternary, int plane, Bit bit, uint8_t* out) {
  const int64_t Kb = bits_blocks(K);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < Kb; ++h) {
      uint32_t word = 0;
      const int64_t len = std::min(kBitsBlock, K - kBitsBlock * h);
      for (int64_t j = 0; j < len; ++j) {
        const int b = bit(n, kBitsBlock * h + j);
        if (b < 0) return false;
        word |= static_cast<uint32_t>(b) << j;
      }
      store_u32(out + bits_word_offset(K, ternary, n, h, plane), word);
    }
  return true;
}

// Calls body(m0, m1, t0, t1) over a 2-D split of the output: weight tiles first (each tile is
// read once per block of rows), activation rows (in multiples of 8) when tiles alone are too
// few.
template <typename F>
void split_mt(int64_t M, int64_t N, int64_t K, F body) {
  const int64_t T = bits_padded_rows(N) / kBitsRows;
  const int threads = pool_threads();
  if (threads == 1 || M * N * K < kMinParallelWork) {
    body(int64_t{0}, M, int64_t{0}, T);
    return;
  }
  const int64_t want = 4 * static_cast<int64_t>(threads);
  const int64_t tb = std::max<int64_t>(1, (T + want - 1) / want);
  const int64_t t_chunks = (T + tb - 1) / tb;
  int64_t m_chunks = 1, mb = M;
  if (t_chunks < want && M > 8) {
    m_chunks = std::min<int64_t>((want + t_chunks - 1) / t_chunks, (M + 7) / 8);
    mb = ((M + m_chunks - 1) / m_chunks + 7) / 8 * 8;
    m_chunks = (M + mb - 1) / mb;
  }
  parallel_for(t_chunks * m_chunks, [&](int64_t c) {
    const int64_t mc = c / t_chunks, tc = c % t_chunks;
    const int64_t m0 = mc * mb, t0 = tc * tb;
    body(m0, std::min(M, m0 + mb), t0, std::min(T, t0 + tb));
  });
}

void gemm_float(bool ternary, const float* x, int64_t M, const uint8_t* w, const float* alpha,
                const float* bias, int64_t N, int64_t K, float* y) {
  const bits::Kernels& k = bits::kernels();
  bits::FloatProblem p{x, nullptr, w, alpha, bias, y, M, N, K, ternary};
  if (k.float_call && k.float_call(p)) return;
  auto run = [&](const bits::FloatProblem& q) {
    split_mt(q.M, N, K, [&](int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
      k.float_tiles(q, m0, m1, t0, t1);
    });
  };
  if (!k.tables) {
    run(p);
    return;
  }
  const int64_t tf = bits::table_floats(K);
  int64_t panel = std::min(M, std::max<int64_t>(1, kTableBudget / tf));
  if (panel < M) panel = std::max<int64_t>(8, panel / 8 * 8);
  std::vector<float> buf(static_cast<size_t>(panel * tf + 8));
  float* tab = buf.data();
  tab += (8 - (reinterpret_cast<uintptr_t>(tab) / 4) % 8) % 8;  // 32-byte aligned
  for (int64_t m0 = 0; m0 < M; m0 += panel) {
    const int64_t rows = std::min(panel, M - m0);
    auto build = [&](int64_t r) { k.tables(x + (m0 + r) * K, K, ternary, tab + r * tf); };
    if (pool_threads() > 1 && rows > 1 && rows * K >= kMinParallelWork / 16)
      parallel_for(rows, build);
    else
      for (int64_t r = 0; r < rows; ++r) build(r);
    bits::FloatProblem q = p;
    q.x = x + m0 * K;
    q.tab = tab;
    q.y = y + m0 * N;
    q.M = rows;
    run(q);
  }
}

}  // namespace

bool pack_binary(const uint8_t* codes, int64_t N, int64_t K, uint8_t* out) {
  std::fill(out, out + bits_packed_nbytes(N, K, false), uint8_t{0});
  return pack_plane(N, K, false, 0, [&](int64_t n, int64_t k) {
    const uint8_t c = codes[n * K + k];
    return c > 1 ? -1 : static_cast<int>(c);
  }, out);
}

bool pack_ternary(const int8_t* codes, int64_t N, int64_t K, uint8_t* out) {
  std::fill(out, out + bits_packed_nbytes(N, K, true), uint8_t{0});
  for (int plane = 0; plane < 2; ++plane) {
    const int8_t want = plane == 0 ? 1 : -1;
    const bool ok = pack_plane(N, K, true, plane, [&](int64_t n, int64_t k) {
      const int8_t c = codes[n * K + k];
      return c < -1 || c > 1 ? -1 : static_cast<int>(c == want);
    }, out);
    if (!ok) return false;
  }
  return true;
}

void gemm_binary(const float* x, int64_t M, const uint8_t* wbits, const float* alpha,
                 const float* bias, int64_t N, int64_t K, bool xnor, float* y) {
  if (M <= 0 || N <= 0) return;
  if (!xnor) {
    gemm_float(false, x, M, wbits, alpha, bias, N, K, y);
    return;
  }
  const int64_t Kb = bits_blocks(K);
  std::vector<uint32_t> xw(static_cast<size_t>(M * Kb), 0);
  std::vector<float> beta(static_cast<size_t>(M));
  auto prep = [&](int64_t m) {
    const float* xr = x + m * K;
    uint32_t* wr = xw.data() + m * Kb;
    for (int64_t h = 0; h < Kb; ++h) {
      uint32_t word = 0;
      const int64_t len = std::min(kBitsBlock, K - kBitsBlock * h);
      for (int64_t j = 0; j < len; ++j)
        word |= static_cast<uint32_t>(xr[kBitsBlock * h + j] < 0.0f) << j;
      wr[h] = word;
    }
    beta[m] = K > 0 ? static_cast<float>(quant::sum_abs(xr, K) / static_cast<double>(K)) : 0.0f;
  };
  if (pool_threads() > 1 && M * K >= kMinParallelWork) parallel_for(M, prep);
  else for (int64_t m = 0; m < M; ++m) prep(m);
  const bits::Kernels& k = bits::kernels();
  const bits::XnorProblem p{xw.data(), beta.data(), wbits, alpha, bias, y, M, N, K};
  split_mt(M, N, K, [&](int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
    k.xnor_tiles(p, m0, m1, t0, t1);
  });
}

void gemm_ternary(const float* x, int64_t M, const uint8_t* wpacked, const float* alpha,
                  const float* bias, int64_t N, int64_t K, float* y) {
  if (M <= 0 || N <= 0) return;
  gemm_float(true, x, M, wpacked, alpha, bias, N, K, y);
}

}  // namespace qk
