// google-benchmark driver over the quantized matmul kernels of the CPU core (no torch).
//
//   cmake -S . -B build-bench -G Ninja -DQKERN_PYTHON=OFF -DQKERN_BENCH=ON -DQKERN_CUDA=OFF
//   cmake --build build-bench --target bench_matmul && build-bench/bench_matmul
//
// Arguments of every benchmark: isa (0 scalar, 1 avx2, 2 avx512, 3 amx for the families with an
// amx table; levels the CPU lacks are not registered), threads, M (rows of x), N (out), K (in).
// Weights are random codes packed once, in enough copies that one sweep over them is >= 256 MiB,
// and each iteration uses the next copy: a GEMV reads its weights from memory, as in decode, not
// from cache. QKERN_BENCH_HOT=1 keeps one copy instead (the weights stay in cache when they fit:
// the kernels' compute alone, e.g. the int2 / int3 / int4 GEMVs of docs/speed.md). Counters:
// weight_GBps = packed weight bytes (codes + scales) / time, the figure to compare with
// BM_read_bw (a streaming read of 256 MiB with the same threads: the roofline);
// GFLOPs = 2 M N K / time. The Python bench (python -m qkern.bench matmul) runs the same
// kernels against torch's in the same process.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "cpu/gemm/bits/api.h"
#include "cpu/gemm/fp8/api.h"
#include "cpu/gemm/lut4/api.h"
#include "cpu/gemm/w23/api.h"
#include "cpu/gemm/w4/api.h"
#include "cpu/gemm/vq/api.h"
#include "cpu/gemm/vq8/api.h"
#include "cpu/gemm/w8/api.h"
#include "cpu/quant/api.h"
#include "bench_aligned.h"
#include "bench_isa.h"
#include "cpu/runtime/isa.h"
#include "cpu/runtime/threadpool.h"

namespace {

constexpr int64_t kSweepBytes = int64_t{256} << 20;

std::vector<float> randn(int64_t n, uint32_t seed, float sd = 1.0f) {
  std::vector<float> v(static_cast<size_t>(n));
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, sd);
  for (auto& f : v) f = nd(rng);
  return v;
}

std::vector<uint8_t> random_bytes(int64_t n, uint32_t seed, int lo, int hi) {
  std::vector<uint8_t> v(static_cast<size_t>(n));
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(lo, hi);
  for (auto& b : v) b = static_cast<uint8_t>(d(rng));
  return v;
}

// One packed weight (its bytes, in `copies` copies) and the call that multiplies by it.
struct Weights {
  int64_t bytes = 0;  // packed codes + scales of one copy
  int copies = 1;
  std::function<void(int copy, const float* x, int64_t m, float* y)> run;
};

int copies_for(int64_t bytes) {
  static const bool hot = [] {
    const char* v = std::getenv("QKERN_BENCH_HOT");
    return v && std::strcmp(v, "0") != 0 && *v;
  }();
  if (hot) return 1;
  return static_cast<int>(std::max<int64_t>(1, (kSweepBytes + bytes - 1) / bytes));
}

// `copies` copies of v, each 64-byte aligned (aligned_buffer).
template <typename T>
std::shared_ptr<std::vector<std::shared_ptr<T>>> replicate(const std::vector<T>& v, int copies) {
  auto out = std::make_shared<std::vector<std::shared_ptr<T>>>();
  for (int c = 0; c < copies; ++c) {
    out->push_back(aligned_buffer<T>(static_cast<int64_t>(v.size())));
    std::memcpy(out->back().get(), v.data(), v.size() * sizeof(T));
  }
  return out;
}

// Sets w.bytes (packed weights + `extra` bytes of scales) and w.copies, and returns the
// copies of `packed` the calls rotate through.
template <typename T>
std::shared_ptr<std::vector<std::shared_ptr<T>>> rotate(Weights& w, const std::vector<T>& packed,
                                                        size_t extra) {
  w.bytes = static_cast<int64_t>(packed.size() * sizeof(T) + extra);
  w.copies = copies_for(w.bytes);
  return replicate(packed, w.copies);
}

void run_bench(benchmark::State& state, const std::function<Weights(int64_t, int64_t)>& make) {
  qk::set_isa(static_cast<qk::Isa>(state.range(0)));
  qk::set_num_threads(static_cast<int>(state.range(1)));
  const int64_t m = state.range(2), n = state.range(3), k = state.range(4);
  Weights w = make(n, k);
  const auto x = randn(m * k, 7);
  std::vector<float> y(static_cast<size_t>(m * n));
  int c = 0;
  for (auto _ : state) {
    w.run(c, x.data(), m, y.data());
    c = (c + 1) % w.copies;
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double it = static_cast<double>(state.iterations());
  state.counters["weight_GBps"] = benchmark::Counter(it * static_cast<double>(w.bytes) / 1e9,
                                                     benchmark::Counter::kIsRate);
  state.counters["GFLOPs"] = benchmark::Counter(it * 2.0 * m * n * k / 1e9,
                                                benchmark::Counter::kIsRate);
}

// ---- the kernels -------------------------------------------------------------------------

// table8: the 4-bit codebook fast mode (gemm_lut4_fast: nibbles are table indices).
Weights make_w4(int64_t n, int64_t k, int64_t group, int mode,
                const uint8_t* table8 = nullptr) {
  const auto raw = random_bytes(n * k, 1, 0, 15);
  std::vector<int8_t> codes(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) codes[i] = static_cast<int8_t>(raw[i] - 8);
  std::vector<uint8_t> packed(static_cast<size_t>(qk::w4_packed_nbytes(n, k)));
  qk::pack_w4(codes.data(), n, k, packed.data());
  const auto scales = randn(qk::w4_padded_rows(n) * k / group, 2, 0.01f);
  Weights w;
  auto p = rotate(w, packed, 4 * scales.size());
  auto s = replicate(scales, w.copies);
  w.run = [=](int c, const float* x, int64_t m, float* y) {
    qk::gemm_w4(x, m, (*p)[c].get(), (*s)[c].get(), nullptr, nullptr, n, k, group, mode, y,
                nullptr, table8);
  };
  return w;
}

Weights make_lut4(int64_t n, int64_t k, int64_t group) {
  static const float kNf4[16] = {-1.0f, -0.6961928f, -0.5250731f, -0.3949175f, -0.2844414f,
                                 -0.1847734f, -0.09105004f, 0.0f, 0.0795803f, 0.1609302f,
                                 0.2461123f, 0.3379152f, 0.4407098f, 0.562617f, 0.7229568f,
                                 1.0f};
  const auto codes = random_bytes(n * k, 3, 0, 15);
  std::vector<uint8_t> packed(static_cast<size_t>(n * k / 2));
  qk::pack_bits(codes.data(), n * k, 4, false, packed.data());
  const auto scales = randn(n * k / group, 4, 0.01f);
  Weights w;
  auto p = rotate(w, packed, 4 * scales.size());
  auto s = replicate(scales, w.copies);
  w.run = [=](int c, const float* x, int64_t m, float* y) {
    qk::gemm_lut4(x, m, (*p)[c].get(), (*s)[c].get(), kNf4, nullptr, n, k, group, y);
  };
  return w;
}

// GPTVQ's layout (qkern.vq.VQLinear): random codes of dim-element vectors (already in the
// 16-row packed order; 4-bit words for 16-entry codebooks, as VQLinear packs them),
// kc-entry codebooks per group_rows rows (0: one per layer), no scales.
Weights make_vq(int64_t n, int64_t k, int64_t dim, int64_t kc, int64_t group_rows) {
  const int64_t nv = k / dim, rows = group_rows ? group_rows : n, nb = (n + 15) / 16;
  const int64_t groups = (n + rows - 1) / rows;
  const bool words = kc == 16;
  const auto packed = words ? random_bytes(nb * ((nv + 7) / 8) * 64, 11, 0, 255)
                            : random_bytes(nb * 16 * nv, 11, 0, static_cast<int>(kc - 1));
  const auto books = randn(groups * kc * dim, 12, 0.02f);
  Weights w;
  auto p = rotate(w, packed, 4 * books.size());
  w.run = [=](int c, const float* x, int64_t m, float* y) {
    const uint8_t* codes = (*p)[c].get();
    if (words)
      qk::gemm_vq_p4(x, m, reinterpret_cast<const uint32_t*>(codes), n, nv, books.data(),
                     groups, kc, dim, rows, nullptr, 1, nullptr, y);
    else
      qk::gemm_vq(x, m, codes, n, nv, books.data(), groups, kc, dim, rows, nullptr, 1, nullptr,
                  y);
  };
  return w;
}

// The same weights in gemm_vq8's int8 fast mode (codes in 16-row x 4-vector groups, two to a
// byte for 16-entry codebooks, as VQLinear packs them; int8 codebooks).
Weights make_vq8(int64_t n, int64_t k, int64_t dim, int64_t kc, int64_t group_rows) {
  const int64_t nv = k / dim, rows = group_rows ? group_rows : n, nb = (n + 15) / 16;
  const int64_t groups = (n + rows - 1) / rows;
  const bool nib = kc == 16;
  const auto packed = nib ? random_bytes(nb * 8 * nv, 11, 0, 255)
                          : random_bytes(nb * 16 * nv, 11, 0, static_cast<int>(kc - 1));
  const auto raw = random_bytes(groups * kc * dim, 12, 1, 255);
  std::vector<int8_t> books(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) books[i] = static_cast<int8_t>(raw[i] - 128);
  const std::vector<float> bs(static_cast<size_t>(groups), 0.001f);
  Weights w;
  auto p = rotate(w, packed, books.size());
  w.run = [=](int c, const float* x, int64_t m, float* y) {
    qk::gemm_vq8(x, m, (*p)[c].get(), n, nv, books.data(), bs.data(), groups, kc, dim, rows,
                 nullptr, 1, nullptr, y, nib);
  };
  return w;
}

Weights make_w8(int64_t n, int64_t k, bool a8) {
  const auto raw = random_bytes(n * k, 5, 1, 255);
  std::vector<int8_t> codes(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) codes[i] = static_cast<int8_t>(raw[i] - 128);
  std::vector<int8_t> packed(static_cast<size_t>(qk::w8_packed_nbytes(n, k)));
  qk::pack_w8(codes.data(), n, k, packed.data());
  const auto scales = randn(n, 6, 0.01f);
  Weights w;
  auto p = rotate(w, packed, 4 * scales.size());
  w.run = [=](int c, const float* x, int64_t m, float* y) {
    if (a8)
      qk::gemm_w8a8(x, m, (*p)[c].get(), scales.data(), nullptr, n, k, y);
    else
      qk::gemm_w8a16(x, m, (*p)[c].get(), scales.data(), nullptr, n, k, y);
  };
  return w;
}

Weights make_bits(int64_t n, int64_t k, bool ternary, bool xnor) {
  const auto packed = random_bytes(qk::bits_packed_nbytes(n, k, ternary), 8, 0, 255);
  const auto alpha = randn(n, 9, 0.01f);
  Weights w;
  auto p = rotate(w, packed, 4 * alpha.size());
  w.run = [=](int c, const float* x, int64_t m, float* y) {
    if (ternary)
      qk::gemm_ternary(x, m, (*p)[c].get(), alpha.data(), nullptr, n, k, y);
    else
      qk::gemm_binary(x, m, (*p)[c].get(), alpha.data(), nullptr, n, k, xnor, y);
  };
  return w;
}

// 2-/3-bit: codes u = q - qmin in [0, 2^bits), scales in the tile layout.
Weights make_w23(int64_t n, int64_t k, int bits, int64_t group, int mode) {
  const auto codes = random_bytes(n * k, 10, 0, (1 << bits) - 1);
  std::vector<uint8_t> packed(static_cast<size_t>(qk::w23_packed_nbytes(n, k, bits)));
  qk::pack_w23(codes.data(), n, k, bits, packed.data());
  const auto scales = randn(qk::w23_padded_rows(n) * k / group, 11, 0.01f);
  Weights w;
  auto p = rotate(w, packed, 4 * scales.size());
  const int qmin = -(1 << (bits - 1));
  w.run = [=](int c, const float* x, int64_t m, float* y) {
    qk::gemm_w23(x, m, (*p)[c].get(), scales.data(), nullptr, nullptr, n, k, group, bits, qmin,
                 mode, y);
  };
  return w;
}

// FP8 E4M3 bytes (NaN codes 0x7f / 0xff avoided) with one scale per output channel.
Weights make_fp8(int64_t n, int64_t k) {
  auto codes = random_bytes(n * k, 12, 0, 253);
  for (auto& c : codes)
    if ((c & 0x7f) == 0x7f) c = 0x7e;
  const auto scales = randn(n, 13, 0.01f);
  Weights w;
  auto p = rotate(w, codes, 4 * scales.size());
  w.run = [=](int c, const float* x, int64_t m, float* y) {
    qk::gemm_fp8(x, m, (*p)[c].get(), scales.data(), nullptr, n, k, k, qk::kFp8E4M3, y);
  };
  return w;
}

void BM_int3_g128_fast(benchmark::State& s) {
  run_bench(s, [](int64_t n, int64_t k) { return make_w23(n, k, 3, 128, qk::kW23Fast); });
}
void BM_int2_g128_fast(benchmark::State& s) {
  run_bench(s, [](int64_t n, int64_t k) { return make_w23(n, k, 2, 128, qk::kW23Fast); });
}
void BM_vq_d4_256_per_layer(benchmark::State& s) {
  run_bench(s, [](int64_t n, int64_t k) { return make_vq(n, k, 4, 256, 0); });
}
void BM_vq_d2_16_per_16_rows(benchmark::State& s) {
  run_bench(s, [](int64_t n, int64_t k) { return make_vq(n, k, 2, 16, 16); });
}
void BM_vq8_d4_256_per_layer(benchmark::State& s) {
  run_bench(s, [](int64_t n, int64_t k) { return make_vq8(n, k, 4, 256, 0); });
}
void BM_vq8_d2_16_per_16_rows(benchmark::State& s) {
  run_bench(s, [](int64_t n, int64_t k) { return make_vq8(n, k, 2, 16, 16); });
}
void BM_fp8_e4m3_channel(benchmark::State& s) {
  run_bench(s, [](int64_t n, int64_t k) { return make_fp8(n, k); });
}
void BM_int4_g128_exact(benchmark::State& s) {
  run_bench(s, [](int64_t n, int64_t k) { return make_w4(n, k, 128, qk::kW4Exact); });
}
void BM_int4_g128_fast(benchmark::State& s) {
  run_bench(s, [](int64_t n, int64_t k) { return make_w4(n, k, 128, qk::kW4Fast); });
}
void BM_nf4_g64(benchmark::State& s) {
  run_bench(s, [](int64_t n, int64_t k) { return make_lut4(n, k, 64); });
}
void BM_nf4_g64_fast(benchmark::State& s) {
  // nf4's table as gemm_lut4_fast takes it: t8 + 128, t8 = round(table * 127) (tmax = 1)
  static const uint8_t kNf4T8[16] = {1,   40,  61,  78,  92,  105, 116, 128,
                                     138, 148, 159, 171, 184, 199, 220, 255};
  run_bench(s, [](int64_t n, int64_t k) { return make_w4(n, k, 64, qk::kW4Fast, kNf4T8); });
}
void BM_w8a8(benchmark::State& s) {
  run_bench(s, [](int64_t n, int64_t k) { return make_w8(n, k, true); });
}
void BM_w8a16(benchmark::State& s) {
  run_bench(s, [](int64_t n, int64_t k) { return make_w8(n, k, false); });
}
void BM_binary(benchmark::State& s) {
  run_bench(s, [](int64_t n, int64_t k) { return make_bits(n, k, false, false); });
}
void BM_binary_xnor(benchmark::State& s) {
  run_bench(s, [](int64_t n, int64_t k) { return make_bits(n, k, false, true); });
}
void BM_ternary(benchmark::State& s) {
  run_bench(s, [](int64_t n, int64_t k) { return make_bits(n, k, true, false); });
}

// The roofline: a streaming read of 256 MiB (sum of 64-bit words, four accumulators, in
// 1 MiB tasks over the pool) with the same threads.
void BM_read_bw(benchmark::State& state) {
  qk::set_num_threads(static_cast<int>(state.range(0)));
  constexpr int64_t kTask = int64_t{1} << 17;  // words per task (1 MiB)
  const int64_t words = kSweepBytes / 8, tasks = words / kTask;
  const std::vector<uint64_t> v(static_cast<size_t>(words), 1);
  std::vector<uint64_t> part(static_cast<size_t>(tasks));
  for (auto _ : state) {
    qk::parallel_for(tasks, [&](int64_t t) {
      const uint64_t* p = v.data() + t * kTask;
      uint64_t a[16] = {};  // 16 independent sums: vectorized, never latency-bound
      for (int64_t i = 0; i < kTask; i += 16)
        for (int j = 0; j < 16; ++j) a[j] += p[i + j];
      uint64_t s = 0;
      for (int j = 0; j < 16; ++j) s += a[j];
      part[static_cast<size_t>(t)] = s;
    });
    benchmark::DoNotOptimize(part.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * kSweepBytes);
}

// threads x M x (N, K): decode (M = 1, 8) and prefill (M = 128, 512) on the shapes.
void ShapesOn(benchmark::internal::Benchmark* b, bool with_amx) {
  b->ArgNames({"isa", "threads", "M", "N", "K"});
  for (int64_t isa : bench_isas(with_amx))
    for (int t : {2})
      for (auto nk : {std::pair<int64_t, int64_t>{4096, 4096}, {11008, 4096}, {4096, 11008}})
        for (int64_t m : {1, 8, 128, 512}) b->Args({isa, t, m, nk.first, nk.second});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}
void Shapes(benchmark::internal::Benchmark* b) { ShapesOn(b, false); }
void ShapesWithAmx(benchmark::internal::Benchmark* b) { ShapesOn(b, true); }

// The decode shapes only (VQLinear's float mode decodes the weight for more than 32 rows of x).
void DecodeShapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"isa", "threads", "M", "N", "K"});
  for (int64_t isa : bench_isas())
    for (auto nk : {std::pair<int64_t, int64_t>{4096, 4096}, {11008, 4096}, {4096, 11008}})
      for (int64_t m : {1, 8}) b->Args({isa, 2, m, nk.first, nk.second});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_read_bw)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_int4_g128_exact)->Apply(Shapes);
BENCHMARK(BM_int4_g128_fast)->Apply(ShapesWithAmx);
BENCHMARK(BM_nf4_g64)->Apply(Shapes);
BENCHMARK(BM_nf4_g64_fast)->Apply(ShapesWithAmx);
BENCHMARK(BM_int3_g128_fast)->Apply(ShapesWithAmx);
BENCHMARK(BM_int2_g128_fast)->Apply(ShapesWithAmx);
BENCHMARK(BM_vq_d4_256_per_layer)->Apply(DecodeShapes);
BENCHMARK(BM_vq_d2_16_per_16_rows)->Apply(DecodeShapes);
BENCHMARK(BM_vq8_d4_256_per_layer)->Apply(ShapesWithAmx);
BENCHMARK(BM_vq8_d2_16_per_16_rows)->Apply(ShapesWithAmx);
BENCHMARK(BM_fp8_e4m3_channel)->Apply(ShapesWithAmx);
BENCHMARK(BM_w8a8)->Apply(ShapesWithAmx);
BENCHMARK(BM_w8a16)->Apply(ShapesWithAmx);
BENCHMARK(BM_binary)->Apply(ShapesWithAmx);
BENCHMARK(BM_binary_xnor)->Apply(Shapes);
BENCHMARK(BM_ternary)->Apply(ShapesWithAmx);

BENCHMARK_MAIN();
