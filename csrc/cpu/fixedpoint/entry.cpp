// Requantization entry points: ISA dispatch and the work spread over the thread pool in blocks
// of rows x channels (every element is computed alone, so results do not depend on the split).
#include "cpu/fixedpoint/kernels.h"
#include "cpu/runtime/threadpool.h"

namespace qk {
namespace {

constexpr int64_t kMinTask = int64_t{1} << 15;  // elements per task, so that waking the pool pays
constexpr int64_t kChanBlock = 4096;             // channel block (a multiple of 16)

template <class Out, class Fn>
void run(const int32_t* acc, int64_t rows, int64_t channels, const Requant& q, Out* out, Fn fn) {
  if (rows <= 0 || channels <= 0) return;
  const int64_t cblocks = (channels + kChanBlock - 1) / kChanBlock;
  const int64_t cw = channels < kChanBlock ? channels : kChanBlock;
  int64_t per = kMinTask / cw;
  per = per < 1 ? 1 : per;
  const int64_t rblocks = (rows + per - 1) / per;
  auto task = [&](int64_t t) {
    const int64_t rb = t / cblocks, cb = t % cblocks;
    const int64_t r0 = rb * per, r1 = r0 + per < rows ? r0 + per : rows;
    const int64_t c0 = cb * kChanBlock, c1 = c0 + kChanBlock < channels ? c0 + kChanBlock
                                                                         : channels;
    fn(acc + r0 * channels, r1 - r0, channels, c0, c1, q, out + r0 * channels);
  };
  const int64_t tasks = rblocks * cblocks;
  if (tasks == 1 || pool_threads() == 1) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
    return;
  }
  parallel_for(tasks, task);
}

}  // namespace

void requantize_s32_s8(const int32_t* acc, int64_t rows, int64_t channels, const Requant& q,
                       int8_t* out) {
  run(acc, rows, channels, q, out, fixedpoint::kernels().s8);
}

void requantize_s32_s32(const int32_t* acc, int64_t rows, int64_t channels, const Requant& q,
                        int32_t* out) {
  run(acc, rows, channels, q, out, fixedpoint::kernels().s32);
}

}  // namespace qk
