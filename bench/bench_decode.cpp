// google-benchmark driver over the decode-step kernels (csrc/cpu/decode/api.h), per ISA (0
// scalar, 1 avx2, 2 avx512: every level the CPU has, or QKERN_BENCH_ISA=...), one thread, at
// the shapes of the 337M Llama of `qkern bench decode --model synthetic-337m` (hidden 2048,
// intermediate 5632, 16 heads of 128) and of a 7B one (4096; 32 heads of 128, 8 KV heads),
// attention over 64 / 512 / 4096 cached positions. In cache, back to back: the kernels' own
// cost; inside a decode step they run after GEMVs that evicted them (python/qkern/tools/bench
// decode, docs/speed.md "Seventeenth pass").
//
//   cmake --build build/bench --target bench_decode && build/bench/bench_decode
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "bench_isa.h"
#include "cpu/decode/api.h"
#include "cpu/runtime/isa.h"
#include "cpu/runtime/threadpool.h"

namespace {

std::vector<float> randn(int64_t n, unsigned seed) {
  std::vector<float> v(static_cast<size_t>(n));
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& f : v) f = nd(rng);
  return v;
}

void setup(benchmark::State& state) {
  qk::set_isa(static_cast<qk::Isa>(state.range(0)));
  qk::set_num_threads(1);
}

void BM_rms_norm_residual(benchmark::State& state) {  // args: isa, n
  setup(state);
  const int64_t n = state.range(1);
  auto x = randn(n, 1), r = randn(n, 2), w = randn(n, 3), s = x, out = x;
  for (auto _ : state) {
    qk::rms_norm_f32(x.data(), r.data(), w.data(), 1, n, 1e-5f, s.data(), out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * n * 4 * 5);
}

void BM_silu_mul(benchmark::State& state) {  // args: isa, n
  setup(state);
  const int64_t n = state.range(1);
  auto g = randn(n, 1), u = randn(n, 2), out = g;
  for (auto _ : state) {
    qk::silu_mul_f32(g.data(), u.data(), n, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * n * 4 * 3);
}

void BM_attention_step(benchmark::State& state) {  // args: isa, heads, kv_heads, positions
  setup(state);
  const int64_t h = state.range(1), kvh = state.range(2), len = state.range(3), d = 128;
  const qk::AttentionStep a{1, h, kvh, d, len, len - 1, 1.0f / std::sqrt(float(d))};
  auto q = randn(h * d, 1), k = randn(kvh * d, 2), v = randn(kvh * d, 3);
  auto kc = randn(kvh * len * d, 4), vc = randn(kvh * len * d, 5), y = q;
  std::vector<float> cs(d), sn(d);
  for (int64_t i = 0; i < d; ++i) cs[i] = std::cos(0.1f * i), sn[i] = std::sin(0.1f * i);
  for (auto _ : state) {
    qk::attention_step_f32(a, q.data(), k.data(), v.data(), cs.data(), sn.data(), kc.data(),
                           vc.data(), y.data());
    benchmark::DoNotOptimize(y.data());
  }
  state.SetBytesProcessed(state.iterations() * 2 * kvh * len * d * 4);  // the caches read
}

void NormArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"isa", "n"});
  for (int64_t isa : bench_isas())
    for (int64_t n : {2048, 4096}) b->Args({isa, n});
}

void SiluArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"isa", "n"});
  for (int64_t isa : bench_isas())
    for (int64_t n : {5632, 11008}) b->Args({isa, n});
}

void AttnArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"isa", "heads", "kv", "pos"});
  for (int64_t isa : bench_isas())
    for (int64_t len : {64, 512, 4096}) {
      b->Args({isa, 16, 16, len});
      b->Args({isa, 32, 8, len});
    }
  b->Unit(benchmark::kMicrosecond);
}

}  // namespace

BENCHMARK(BM_rms_norm_residual)->Apply(NormArgs);
BENCHMARK(BM_silu_mul)->Apply(SiluArgs);
BENCHMARK(BM_attention_step)->Apply(AttnArgs);

BENCHMARK_MAIN();
