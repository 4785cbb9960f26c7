// Signal coders' entry points (api.h): ISA dispatch, and the independent rows / channels spread
// over the thread pool (each one coded whole by one thread, so results do not depend on the
// thread count).
#include "cpu/runtime/threadpool.h"
#include "cpu/signal/kernels.h"

namespace qk {
namespace {

// Channels per DPCM task: a multiple of 8 (the AVX2 width), so that every ISA fills vectors
// the same way regardless of the thread count.
constexpr int64_t kDpcmBlock = 64;

void run(int64_t tasks, const std::function<void(int64_t)>& fn) {
  if (tasks == 1 || pool_threads() == 1) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
    return;
  }
  parallel_for(tasks, fn);
}

void dpcm(const signal::DpcmJob& j) {
  if (j.a.t <= 0 || j.a.c <= 0) return;
  const auto& k = signal::kernels();
  const int64_t tasks = (j.a.c + kDpcmBlock - 1) / kDpcmBlock;
  run(tasks, [&](int64_t i) {
    const int64_t c0 = i * kDpcmBlock, c1 = c0 + kDpcmBlock < j.a.c ? c0 + kDpcmBlock : j.a.c;
    k.dpcm(j, c0, c1);
  });
}

}  // namespace

void ima_adpcm_encode(const int16_t* pcm, int64_t channels, int64_t n, uint8_t* codes,
                      int32_t* state) {
  if (channels <= 0 || n < 0) return;
  run(channels, [&](int64_t c) {
    signal::adpcm_encode_row(pcm + c * n, n, codes + c * n, state + 2 * c);
  });
}

void ima_adpcm_decode(const uint8_t* codes, int64_t channels, int64_t n, int16_t* pcm,
                      int32_t* state) {
  if (channels <= 0 || n < 0) return;
  run(channels, [&](int64_t c) {
    signal::adpcm_decode_row(codes + c * n, n, pcm + c * n, state + 2 * c);
  });
}

void dpcm_encode_f32(const DpcmArgs& a, const float* x, uint8_t* codes, float* xh) {
  dpcm({a, x, codes, xh});
}

void dpcm_decode_f32(const DpcmArgs& a, const uint8_t* codes, float* xh) {
  dpcm({a, nullptr, const_cast<uint8_t*>(codes), xh});
}

}  // namespace qk
