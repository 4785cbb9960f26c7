// int8-weight matmuls: weight packing, activation quantization, ISA dispatch and the split of
// the output into (row range x column-block range) tiles run on the thread pool. Results do
// not depend on the thread count: every output element is computed by one tile, whole.
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "cpu/gemm/w8/kernels.h"
#include "cpu/quant/api.h"
#include "cpu/runtime/threadpool.h"

namespace qk {
namespace {

// Below this many multiply-adds a call runs on one thread: waking the pool costs more.
constexpr int64_t kMinParallelMacs = int64_t{1} << 18;

// Tiles of `mc` rows x `nbc` column blocks; body(m0, m1, b0, b1). Tiles sharing a column
// range are consecutive so a thread's weights stay cached while it walks the rows.
template <typename F>
void run_tiles(int64_t m, int64_t n, int64_t k, int64_t mc, F body) {
  const int64_t nb = w8_padded_n(n) / kW8BlockN;
  const int threads = pool_threads();
  mc = mc < m ? mc : m;
  const int64_t mt = (m + mc - 1) / mc;
  // About 4 tiles per thread at least (the pool balances them dynamically), at most 8 blocks.
  int64_t nbc = nb * mt / (4 * threads);
  nbc = nbc < 1 ? 1 : (nbc > 8 ? 8 : nbc);
  const int64_t nt = (nb + nbc - 1) / nbc;
  auto tile = [&](int64_t c) {
    const int64_t mi = c % mt, ni = c / mt;
    const int64_t m0 = mi * mc, m1 = m0 + mc < m ? m0 + mc : m;
    const int64_t b0 = ni * nbc, b1 = b0 + nbc < nb ? b0 + nbc : nb;
    body(m0, m1, b0, b1);
  };
  if (threads == 1 || mt * nt == 1 || m * n * k < kMinParallelMacs) {
    for (int64_t c = 0; c < mt * nt; ++c) tile(c);
  } else {
    parallel_for(mt * nt, tile);
  }
}

// The (m, k) activation codes as the kernels read them: on a 64-byte boundary (the AMX kernel
// loads 64-byte rows of them, one cache line each only when the rows start on one: rows split
// across two lines ran its tile loop 2.8x slower in a micro-benchmark; with k a multiple of 64
// every row is then aligned) and followed by 4 zero bytes (the AVX2 kernel reads whole 4-byte
// steps; padding weights are 0, so the values would not matter).
class AlignedCodes {
 public:
  AlignedCodes(int64_t m, int64_t k)
      : p_(static_cast<int8_t*>(
            std::aligned_alloc(64, static_cast<size_t>((m * k + 4 + 63) & ~int64_t{63})))) {
    if (!p_) throw std::bad_alloc();
    std::memset(p_ + m * k, 0, 4);
  }
  ~AlignedCodes() { std::free(p_); }
  AlignedCodes(const AlignedCodes&) = delete;
  AlignedCodes& operator=(const AlignedCodes&) = delete;
  int8_t* data() const { return p_; }

 private:
  int8_t* p_;
};

// Per-column vectors padded to Np with zeros (the kernels load whole blocks).
std::vector<float> padded(const float* v, int64_t n) {
  std::vector<float> out(w8_padded_n(n), 0.0f);
  if (v) std::memcpy(out.data(), v, sizeof(float) * n);
  return out;
}

// k == 0: the sum is empty (acc = 0, and sx = 1 for an all-zero row), so both ops give
// 0 * w_scale[n] (+ bias[n]).
void fill_empty(const float* w_scale, const float* bias, int64_t m, int64_t n, float* y) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) y[i * n + j] = w8::w8a16_value(0.0f, w_scale[j], bias, j);
}

// The int8 product on the running ISA's kernels, its per-row sums (if it takes them) first.
void run_s8s8(const int8_t* xq, int64_t m, const int8_t* packed, int64_t n, int64_t k,
              w8::W8Out out) {
  const auto& p = w8::kernels();
  std::vector<int32_t> xsum;
  if (p.xsums) {
    xsum.resize(static_cast<size_t>(m));
    p.xsums(xq, m, k, xsum.data());
    out.xsum = xsum.data();
  }
  // Row tiles of about 512 KiB of codes but at least 128 rows, a multiple of 32 rows (the AMX
  // micro-tile's height, a multiple of the AVX2 / AVX-512 ones: 4 and 8), so that only a
  // call's last rows can fall short of the AMX tiles. (The floor: at K = 11008, 32-row tiles
  // read each column group's weights 4 times for M = 128; 128 rows took 4096x11008 M = 128
  // from 5.2-5.4 to 4.0 ms on amx, 11.2-11.7 to 10.2 on avx512, M = 512 unchanged.)
  const int64_t mc = (int64_t{512} << 10) / k / 32 * 32;
  run_tiles(m, n, k, mc < 128 ? 128 : mc, [&](int64_t m0, int64_t m1, int64_t b0, int64_t b1) {
    p.s8s8(xq, m0, m1, packed, k, b0, b1, out);
  });
}

}  // namespace

void pack_w8(const int8_t* codes, int64_t n, int64_t k, int8_t* packed) {
  const int64_t np = w8_padded_n(n), kp = w8_padded_k(k);
  std::memset(packed, 0, static_cast<size_t>(np * kp));
  auto body = [&](int64_t b) {
    int8_t* dst = packed + b * kW8BlockN * kp;
    for (int64_t j = 0; j < kW8BlockN && b * kW8BlockN + j < n; ++j) {
      const int8_t* row = codes + (b * kW8BlockN + j) * k;
      for (int64_t kk = 0; kk < k; ++kk) dst[(kk / 4) * 64 + j * 4 + (kk % 4)] = row[kk];
    }
  };
  if (n * k < kMinParallelMacs) {
    for (int64_t b = 0; b < np / kW8BlockN; ++b) body(b);
  } else {
    parallel_for(np / kW8BlockN, body);
  }
}

void unpack_w8(const int8_t* packed, int64_t n, int64_t k, int8_t* codes) {
  const int64_t kp = w8_padded_k(k);
  for (int64_t r = 0; r < n; ++r) {
    const int8_t* src = packed + (r / kW8BlockN) * kW8BlockN * kp + (r % kW8BlockN) * 4;
    for (int64_t kk = 0; kk < k; ++kk) codes[r * k + kk] = src[(kk / 4) * 64 + (kk % 4)];
  }
}

void gemm_s8s8_s32(const int8_t* xq, int64_t m, const int8_t* packed, int64_t n, int64_t k,
                   int32_t* acc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    std::memset(acc, 0, sizeof(int32_t) * static_cast<size_t>(m * n));
    return;
  }
  AlignedCodes codes(m, k);
  std::memcpy(codes.data(), xq, static_cast<size_t>(m * k));
  run_s8s8(codes.data(), m, packed, n, k,
           w8::W8Out{nullptr, nullptr, nullptr, nullptr, acc, n, nullptr});
}

bool gemm_w8a8(const float* x, int64_t m, const int8_t* packed, const float* w_scale,
               const float* bias, int64_t n, int64_t k, float* y) {
  if (m == 0 || n == 0) return false;
  if (k == 0) {
    fill_empty(w_scale, bias, m, n, y);
    return false;
  }
  // Per-row symmetric int8 with the project's quantizer (docs/numerics.md): scale = amax/127,
  // t = x * (1/scale), round-nearest-even, clamp to [-127, 127].
  AlignedCodes xq(m, k);
  std::vector<float> sx(static_cast<size_t>(m));
  const AffineSpec spec{-127, 127, kNearestEven, kMidTread, 0.0f, 0};
  if (quantize_affine_dynamic(x, m * k, k, spec, kScaleAbsMax, 127.0f, 0, sx.data(), nullptr,
                              reinterpret_cast<uint8_t*>(xq.data())))
    return true;
  const std::vector<float> sw = padded(w_scale, n);
  const std::vector<float> b = bias ? padded(bias, n) : std::vector<float>();
  run_s8s8(xq.data(), m, packed, n, k,
           w8::W8Out{sx.data(), sw.data(), bias ? b.data() : nullptr, y, nullptr, n, nullptr});
  return false;
}

void gemm_w8a16(const float* x, int64_t m, const int8_t* packed, const float* w_scale,
                const float* bias, int64_t n, int64_t k, float* y) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    fill_empty(w_scale, bias, m, n, y);
    return;
  }
  const std::vector<float> sw = padded(w_scale, n);
  const std::vector<float> b = bias ? padded(bias, n) : std::vector<float>();
  w8::W8Out out{nullptr, sw.data(), bias ? b.data() : nullptr, y, nullptr, n, nullptr};
  const auto& p = w8::kernels();
  if (p.f32_call && p.f32_call(x, m, packed, n, k, out)) return;
  run_tiles(m, n, k, 96, [&](int64_t m0, int64_t m1, int64_t b0, int64_t b1) {
    p.f32(x, m0, m1, packed, k, b0, b1, out);
  });
}

}  // namespace qk
