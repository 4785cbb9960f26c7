// A small persistent thread pool: parallel_for over chunk indices, the calling thread taking
// part. Sized by qk::set_num_threads; nested calls run inline so work is never oversubscribed.
#pragma once
#include <cstdint>
#include <functional>

namespace qk {

// Public API (qkern.set_num_threads): the pool's size, clamped to [1, max_num_threads()].
void set_num_threads(int n);
int get_num_threads();

// The largest pool: kMaxThreadsPerHardwareThread x the hardware threads. More threads than that
// only add scheduling overhead (4096 threads made a 1024 x 1024 quantize 260x slower).
constexpr int kMaxThreadsPerHardwareThread = 8;
int hardware_threads();  // std::thread::hardware_concurrency(), at least 1
int max_num_threads();

// How long an idle worker spins for the next job before sleeping (microseconds): a decode
// step's GEMVs come tens of microseconds apart and a sleeping worker joins the next one only
// after a futex wake-up. Default kDefaultSpinMicros; QKERN_SPIN_US in the environment (0 to
// 1000000) or set_spin_micros at run time. Spinning holds the core, and a decode step runs
// torch ops (OpenMP) between qkern's GEMVs on the same cores: the 337M Llama's int4 decode ran
// ~97 / 94 / 85 / 59 tok/s with 0 / 50 / 300 / 2000 us (tools/bench decode_synth model).
constexpr int kDefaultSpinMicros = 50;
int spin_micros();
void set_spin_micros(int us);

// Before each job the workers' affinity becomes the caller's CPU mask less the CPU the caller
// runs on (Linux; only when that CPU changed since the last job; QKERN_PIN_WORKERS=0 turns it
// off): a sleeping worker woken onto the busy caller's CPU otherwise waits there for the
// kernel's load balancer (threadpool.cpp, place_workers).
void pool_set_threads(int n);
int pool_threads();

// After fork() the child's first parallel_for creates a fresh pool of the same size (the
// parent's workers do not exist in the child).
// Calls fn(i) for every i in [0, n_chunks), spread over the pool's threads.
void parallel_for(int64_t n_chunks, const std::function<void(int64_t)>& fn);

}  // namespace qk
