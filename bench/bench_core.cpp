// google-benchmark driver over the torch-free CPU kernel core (csrc/cpu/quant/api.h).
//
//   cmake -S . -B build-bench -G Ninja -DQKERN_PYTHON=OFF -DQKERN_BENCH=ON -DQKERN_CUDA=OFF
//   cmake --build build-bench --target bench_core && build-bench/bench_core
//
// The quantize / dequantize benchmarks take the ISA (0 scalar, 1 avx2, 2 avx512: every level
// the CPU has, or QKERN_BENCH_ISA=...) and the thread count (/1, /2) as arguments, set outside
// the timed loop; the baselines and bit packing (not ISA-dispatched) the thread count only. Bytes processed = bytes read + bytes written
// (input array + output array + scales), so "bytes_per_second" compares directly with the
// memcpy baselines, which count source + destination bytes the same way. Output buffers are
// allocated and touched once, before timing: these numbers exclude page faults and allocation
// (the Python bench, python/qkern/tools/bench/core.py, includes them, as a user sees them).
#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "bench_aligned.h"
#include "bench_isa.h"
#include "cpu/quant/api.h"
#include "cpu/runtime/isa.h"
#include "cpu/runtime/threadpool.h"

namespace {

constexpr int64_t kRows = 4096, kCols = 4096, kN = kRows * kCols;

// NF4: bitsandbytes' 16-value table (NF4_VALUES in python/qkern/formats.py; docs/numerics.md
// "Tables"); code = index, not sign-magnitude.
constexpr float kNf4[16] = {-1.0f,
                            -0.6961928009986877f,
                            -0.5250730514526367f,
                            -0.39491748809814453f,
                            -0.28444138169288635f,
                            -0.18477343022823334f,
                            -0.09105003625154495f,
                            0.0f,
                            0.07958029955625534f,
                            0.16093020141124725f,
                            0.24611230194568634f,
                            0.33791524171829224f,
                            0.44070982933044434f,
                            0.5626170039176941f,
                            0.7229568362236023f,
                            1.0f};
constexpr uint8_t kNf4Codes[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

const std::vector<float>& weights() {
  static const std::vector<float> w = [] {
    std::vector<float> v(static_cast<size_t>(kN));
    std::mt19937 rng(0);
    std::normal_distribution<float> nd(0.0f, 0.02f);
    for (auto& f : v) f = nd(rng);
    return v;
  }();
  return w;
}

std::vector<float> lut256() {
  std::vector<float> lut(256, 0.0f);
  for (int k = 0; k < 16; ++k) lut[k] = kNf4[k];
  return lut;
}

void set_threads(benchmark::State& state, int arg = 0) {
  qk::set_num_threads(static_cast<int>(state.range(arg)));
  state.counters["threads"] = static_cast<double>(qk::get_num_threads());
}

// Arguments (isa, threads) of the ISA-dispatched kernels.
void set_isa_threads(benchmark::State& state) {
  qk::set_isa(static_cast<qk::Isa>(state.range(0)));
  set_threads(state, 1);
}

void set_bytes(benchmark::State& state, int64_t bytes_per_iter) {
  state.SetBytesProcessed(state.iterations() * bytes_per_iter);
  state.counters["MB_per_iter"] = static_cast<double>(bytes_per_iter) / 1e6;
}

// ---- baselines ---------------------------------------------------------------------------

// memcpy of `nbytes` source bytes, split over the pool like the kernels are (the calling
// thread takes part); bytes processed = 2 * nbytes (read + write).
void copy_parallel(const uint8_t* src, uint8_t* dst, int64_t nbytes) {
  constexpr int64_t kTask = 1 << 20;
  int64_t tasks = (nbytes + kTask - 1) / kTask;
  if (qk::get_num_threads() == 1 || tasks == 1) {
    std::memcpy(dst, src, static_cast<size_t>(nbytes));
    return;
  }
  qk::parallel_for(tasks, [&](int64_t t) {
    int64_t a = t * kTask, b = a + kTask < nbytes ? a + kTask : nbytes;
    std::memcpy(dst + a, src + a, static_cast<size_t>(b - a));
  });
}

// Baseline sized like the kernels' traffic: range(1) MiB of source.
void BM_memcpy(benchmark::State& state) {
  set_threads(state);
  const int64_t nbytes = state.range(1) << 20;
  std::vector<uint8_t> src(static_cast<size_t>(nbytes), 1), dst(static_cast<size_t>(nbytes), 0);
  for (auto _ : state) {
    copy_parallel(src.data(), dst.data(), nbytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, 2 * nbytes);
}

// Read bandwidth: max|x| over the 64 MiB weight (the statistics pass of a quantizer).
void BM_read_amax(benchmark::State& state) {
  set_isa_threads(state);
  const auto& w = weights();
  std::vector<qk::Stats> st(static_cast<size_t>(kRows));
  for (auto _ : state) {
    qk::group_stats(w.data(), kN, kCols, false, st.data());
    benchmark::DoNotOptimize(st.data());
  }
  set_bytes(state, kN * 4);
}

// ---- quantize ----------------------------------------------------------------------------

// Symmetric mid-tread int, absmax scale per group (int8 channel: group = one row of 4096).
void affine_dynamic(benchmark::State& state, int64_t group, int bits) {
  set_isa_threads(state);
  const auto& w = weights();
  const int32_t qmax = (1 << (bits - 1)) - 1;
  qk::AffineSpec spec{-qmax - 1, qmax, qk::kNearestEven, qk::kMidTread, 0.0f, 0};
  auto codes = aligned_buffer<uint8_t>(kN);
  std::vector<float> scale(static_cast<size_t>(kN / group), 0.0f);
  std::vector<int32_t> zp(static_cast<size_t>(kN / group), 0);
  for (auto _ : state) {
    bool bad = qk::quantize_affine_dynamic(w.data(), kN, group, spec, qk::kScaleAbsMax,
                                           static_cast<float>(qmax), 0, scale.data(), zp.data(),
                                           codes.get());
    benchmark::DoNotOptimize(bad);
    benchmark::ClobberMemory();
  }
  set_bytes(state, kN * 4 + kN + (kN / group) * 4);
}
void BM_quantize_int8_channel(benchmark::State& s) { affine_dynamic(s, kCols, 8); }
void BM_quantize_int4_g128(benchmark::State& s) { affine_dynamic(s, 128, 4); }

void BM_quantize_nf4_g64(benchmark::State& state) {
  set_isa_threads(state);
  const auto& w = weights();
  constexpr int64_t group = 64;
  qk::CodebookSpec spec{kNf4, kNf4Codes, 16, 0, qk::kNearestEven, 0};
  std::vector<uint8_t> codes(static_cast<size_t>(kN), 0);
  std::vector<float> scale(static_cast<size_t>(kN / group), 0.0f);
  for (auto _ : state) {
    bool bad = qk::quantize_codebook_dynamic(w.data(), kN, group, spec, qk::kScaleAbsMax, 1.0f,
                                             0, scale.data(), codes.data());
    benchmark::DoNotOptimize(bad);
    benchmark::ClobberMemory();
  }
  set_bytes(state, kN * 4 + kN + (kN / group) * 4);
}

// ---- dequantize --------------------------------------------------------------------------

void dequant_affine(benchmark::State& state, int64_t group, int bits) {
  set_isa_threads(state);
  const auto& w = weights();
  const int32_t qmax = (1 << (bits - 1)) - 1;
  qk::AffineSpec spec{-qmax - 1, qmax, qk::kNearestEven, qk::kMidTread, 0.0f, 0};
  std::vector<uint8_t> codes(static_cast<size_t>(kN));
  std::vector<float> scale(static_cast<size_t>(kN / group));
  std::vector<int32_t> zp(static_cast<size_t>(kN / group));
  qk::quantize_affine_dynamic(w.data(), kN, group, spec, qk::kScaleAbsMax,
                              static_cast<float>(qmax), 0, scale.data(), zp.data(), codes.data());
  auto out = aligned_buffer(kN);
  for (auto _ : state) {
    qk::dequantize_affine(codes.data(), kN, group, scale.data(), nullptr, true, 0.0f, out.get());
    benchmark::DoNotOptimize(out.get());
    benchmark::ClobberMemory();
  }
  set_bytes(state, kN + (kN / group) * 4 + kN * 4);
}
void BM_dequantize_int8_channel(benchmark::State& s) { dequant_affine(s, kCols, 8); }
void BM_dequantize_int4_g128(benchmark::State& s) { dequant_affine(s, 128, 4); }

void BM_dequantize_lut_nf4_g64(benchmark::State& state) {
  set_isa_threads(state);
  const auto& w = weights();
  constexpr int64_t group = 64;
  qk::CodebookSpec spec{kNf4, kNf4Codes, 16, 0, qk::kNearestEven, 0};
  std::vector<uint8_t> codes(static_cast<size_t>(kN));
  std::vector<float> scale(static_cast<size_t>(kN / group));
  qk::quantize_codebook_dynamic(w.data(), kN, group, spec, qk::kScaleAbsMax, 1.0f, 0,
                                scale.data(), codes.data());
  const std::vector<float> lut = lut256();
  auto out = aligned_buffer(kN);
  for (auto _ : state) {
    qk::dequantize_lut(codes.data(), kN, group, scale.data(), lut.data(), out.get());
    benchmark::DoNotOptimize(out.get());
    benchmark::ClobberMemory();
  }
  set_bytes(state, kN + (kN / group) * 4 + kN * 4);
}

// ---- bit packing -------------------------------------------------------------------------

// range(1) = bits; codes are one byte each (low `bits` bits significant), LSB-first stream.
void BM_pack_bits(benchmark::State& state) {
  set_threads(state);
  const int bits = static_cast<int>(state.range(1));
  std::vector<uint8_t> codes(static_cast<size_t>(kN));
  std::mt19937 rng(1);
  for (auto& c : codes) c = static_cast<uint8_t>(rng() & ((1u << bits) - 1));
  const int64_t nout = qk::packed_nbytes(kN, bits);
  std::vector<uint8_t> out(static_cast<size_t>(nout), 0);
  for (auto _ : state) {
    qk::pack_bits(codes.data(), kN, bits, false, out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, kN + nout);
}

void BM_unpack_bits(benchmark::State& state) {
  set_threads(state);
  const int bits = static_cast<int>(state.range(1));
  const int64_t nin = qk::packed_nbytes(kN, bits);
  std::vector<uint8_t> packed(static_cast<size_t>(nin));
  std::mt19937 rng(2);
  for (auto& c : packed) c = static_cast<uint8_t>(rng());
  std::vector<uint8_t> out(static_cast<size_t>(kN), 0);
  for (auto _ : state) {
    qk::unpack_bits(packed.data(), kN, bits, false, out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, nin + kN);
}

// ---- cold calls, two shapes --------------------------------------------------------------

// As the Python bench times them: a 128 MiB read before every call (nothing of the operands
// left in the caches), 2 threads, manual timing of the call alone; rows x 4096 float32.
// range(0): 0 memcpy of the input (baseline), 1 quantize int8 per-channel, 2 quantize int4
// group-128, 3 dequantize int8 per-channel, 4 dequantize int4 group-128.
void BM_cold(benchmark::State& state) {
  const int kind = static_cast<int>(state.range(0));
  qk::set_isa(static_cast<qk::Isa>(state.range(1)));
  qk::set_num_threads(2);
  const int64_t n = state.range(2) * kCols;
  const int64_t group = kind == 1 || kind == 3 ? kCols : 128;
  const int32_t qmax = kind == 1 || kind == 3 ? 127 : 7;
  const qk::AffineSpec spec{-qmax - 1, qmax, qk::kNearestEven, qk::kMidTread, 0.0f, 0};
  auto x = aligned_buffer(n), y = aligned_buffer(n);
  auto codes = aligned_buffer<uint8_t>(n);
  std::vector<float> scale(static_cast<size_t>(n / group));
  const auto& w = weights();
  for (int64_t i = 0; i < n; ++i) x.get()[i] = w[static_cast<size_t>(i % kN)];
  qk::quantize_affine_dynamic(x.get(), n, group, spec, qk::kScaleAbsMax, static_cast<float>(qmax),
                              0, scale.data(), nullptr, codes.get());
  std::vector<float> flush(static_cast<size_t>(32) << 20, 1.0f);
  float sink = 0.0f;
  for (auto _ : state) {
    for (size_t i = 0; i < flush.size(); i += 16) sink += flush[i];
    const auto t0 = std::chrono::steady_clock::now();
    if (kind == 0) {
      copy_parallel(reinterpret_cast<const uint8_t*>(x.get()), reinterpret_cast<uint8_t*>(y.get()),
                    n * 4);
    } else if (kind <= 2) {
      benchmark::DoNotOptimize(qk::quantize_affine_dynamic(
          x.get(), n, group, spec, qk::kScaleAbsMax, static_cast<float>(qmax), 0, scale.data(),
          nullptr, codes.get()));
    } else {
      qk::dequantize_affine(codes.get(), n, group, scale.data(), nullptr, true, 0.0f, y.get());
    }
    benchmark::ClobberMemory();
    state.SetIterationTime(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  benchmark::DoNotOptimize(sink);
  state.counters["threads"] = 2;
  set_bytes(state, kind == 0 ? 8 * n : 5 * n + 4 * (n / group));
}

void ColdArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"op", "isa", "rows"});
  for (int64_t rows : {4096, 11008})
    for (int64_t op = 0; op < 5; ++op)
      for (int64_t isa : bench_isas())
        if (isa != qk::kIsaScalar && (op > 0 || isa == bench_isas().back()))
          b->Args({op, isa, rows});
  b->Unit(benchmark::kMillisecond)->UseManualTime();
}

void IsaThreadArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"isa", "threads"});
  for (int64_t isa : bench_isas())
    for (int t : {1, 2}) b->Args({isa, t});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

void BitsArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"threads", "bits"});
  for (int t : {1, 2})
    for (int bits : {4, 8, 3}) b->Args({t, bits});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

// memcpy sized 64 MiB (the float32 weight: what quantize reads, dequantize writes) and
// 16 MiB (the one-byte codes: what pack reads).
void CopyArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"threads", "MiB"});
  for (int t : {1, 2})
    for (int mib : {64, 16}) b->Args({t, mib});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_memcpy)->Apply(CopyArgs);
BENCHMARK(BM_read_amax)->Apply(IsaThreadArgs);
BENCHMARK(BM_quantize_int8_channel)->Apply(IsaThreadArgs);
BENCHMARK(BM_quantize_int4_g128)->Apply(IsaThreadArgs);
BENCHMARK(BM_quantize_nf4_g64)->Apply(IsaThreadArgs);
BENCHMARK(BM_dequantize_int8_channel)->Apply(IsaThreadArgs);
BENCHMARK(BM_dequantize_int4_g128)->Apply(IsaThreadArgs);
BENCHMARK(BM_dequantize_lut_nf4_g64)->Apply(IsaThreadArgs);
BENCHMARK(BM_pack_bits)->Apply(BitsArgs);
BENCHMARK(BM_unpack_bits)->Apply(BitsArgs);
BENCHMARK(BM_cold)->Apply(ColdArgs);

BENCHMARK_MAIN();
