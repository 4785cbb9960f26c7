#include "cpu/runtime/threadpool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <pthread.h>
#include <thread>
#if defined(__linux__)
#include <sched.h>
#endif
#include <vector>

namespace qk {
namespace {

class Pool {
 public:
  ~Pool() { resize(1); }

  void resize(int n) {
    std::lock_guard<std::mutex> call_lock(call_mu_);
    stop_workers();
    threads_ = n < 1 ? 1 : n;
    stop_ = false;
    stop_flag_.store(false);
    // New workers start at the current generation: a stale one must not run (or count itself
    // done for) a job that ended before it was born.
    const uint64_t born = generation_.load();
    for (int i = 1; i < threads_; ++i) {
      workers_.emplace_back([this, born] { worker(born); });
#if defined(__linux__)
      pthread_setname_np(workers_.back().native_handle(), "qkern-worker");  // top -H, /proc
#endif
    }
    placed_for_ = -1;
  }

  int threads() const { return threads_; }

  // Job protocol. A job is published as work_ = tag(gen) | 0; anyone (the caller or a worker
  // woken for generation gen) claims chunk i by a CAS of work_ from tag(gen) | i to
  // tag(gen) | i + 1, runs it and counts it in done_. The caller returns once done_ == n: it
  // never waits for a worker that has not claimed a chunk (a worker asleep when the job came,
  // e.g. after a pause between calls, wakes only after a futex / vCPU wake-up that can take
  // longer than the whole job; it then finds the job closed and goes back to waiting). After
  // the job the caller closes work_ (kClosed) before fn_ / n_chunks_ change, so a late CAS on
  // the finished job's word fails, and a successful claim proves the job (its fn_) is live.
  void run(int64_t n_chunks, const std::function<void(int64_t)>& fn) {
    if (n_chunks <= 0) return;
    if (threads_ == 1 || n_chunks == 1 || in_pool_) {
      for (int64_t i = 0; i < n_chunks; ++i) fn(i);
      return;
    }
    std::lock_guard<std::mutex> call_lock(call_mu_);  // one parallel region at a time
    const uint64_t gen = generation_.load() + 1;
    fn_.store(&fn, std::memory_order_relaxed);
    n_chunks_.store(n_chunks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    work_.store(tag(gen), std::memory_order_release);
    place_workers();
    {
      std::lock_guard<std::mutex> lk(mu_);
      generation_.store(gen, std::memory_order_release);
    }
    cv_.notify_all();
    in_pool_ = true;
    drain(gen);
    in_pool_ = false;
    // Chunks others claimed are running on their own cores: the caller has nothing else to
    // do, so it spins (up to kJoinSpinMicros when every thread has a core of its own) rather
    // than paying a futex sleep and wake-up at the end of every call.
    auto pending = [this, n_chunks] { return done_.load(std::memory_order_acquire) != n_chunks; };
    if (pending()) {
      spin_while(pending, threads_ <= hardware_threads() ? kJoinSpinMicros : spin_micros());
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [&] { return !pending(); });
    }
    work_.store(kClosed, std::memory_order_release);
    fn_.store(nullptr, std::memory_order_relaxed);
  }

 private:
  static constexpr int kIndexBits = 40;  // chunk indices < 2^40; generations mod 2^24
  static constexpr uint64_t kIndexMask = (uint64_t{1} << kIndexBits) - 1;
  static constexpr uint64_t kClosed = ~uint64_t{0};  // no job: matches no tag
  static uint64_t tag(uint64_t gen) { return (gen & 0xFFFFFF) << kIndexBits; }

  // Claims and runs chunks of job `gen` until none is left (or another job is current).
  void drain(uint64_t gen) {
    const uint64_t t = tag(gen);
    uint64_t w = work_.load(std::memory_order_acquire);
    for (;;) {
      if ((w & ~kIndexMask) != t) return;
      const int64_t i = static_cast<int64_t>(w & kIndexMask);
      const int64_t n = n_chunks_.load(std::memory_order_relaxed);
      if (i >= n) return;
      if (!work_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel,
                                       std::memory_order_acquire))
        continue;  // w reloaded
      (*fn_.load(std::memory_order_relaxed))(i);
      if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
        std::lock_guard<std::mutex> lk(mu_);  // the caller checks done_ under mu_: no lost wake
        done_cv_.notify_all();
      }
      w = work_.load(std::memory_order_acquire);
    }
  }

  void worker(uint64_t seen) {
    for (;;) {
      // Spin a while for the next job before sleeping on the condition variable: a decode
      // step's GEMVs come tens of microseconds apart, and a sleeping worker joins the next one
      // only after a futex wake-up.
      spin_while([&] {
        return generation_.load(std::memory_order_acquire) == seen &&
               !stop_flag_.load(std::memory_order_relaxed);
      }, spin_micros());
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || generation_.load() != seen; });
        if (stop_) return;
        seen = generation_.load();
      }
      in_pool_ = true;
      drain(seen);
      in_pool_ = false;
    }
  }

  // Keeps the workers off the caller's CPU (Linux). A worker asleep when a job comes is woken
  // by the kernel onto the waker's CPU, or its own last one, when the last-level cache looks
  // busy (Linux's SIS_UTIL skips the search for an idle CPU), and an idle CPU pulls it only at
  // the busy one's next tick: on a 2-vCPU VM half of the calls after a pause ran on one
  // thread, the worker joining 1-3 ms late (a C++ probe: notify, then 4 ms of work; pinned,
  // it joined within 45-110 us every time). So before each job, when the caller's CPU differs
  // from the one the workers were last placed around, each worker's affinity becomes the
  // caller's own mask less that CPU: no system call while the caller stays put (a decode
  // loop), nothing when the caller may run on one CPU only, when the pool has more threads
  // than the caller's CPUs, or with QKERN_PIN_WORKERS=0.
  void place_workers() {
#if defined(__linux__)
    static const bool enabled = [] {
      const char* env = std::getenv("QKERN_PIN_WORKERS");
      return !(env && env[0] == '0' && env[1] == '\0');
    }();
    const int cpu = enabled ? sched_getcpu() : -1;
    if (cpu < 0 || cpu == placed_for_) return;
    placed_for_ = cpu;
    cpu_set_t mask;
    if (sched_getaffinity(0, sizeof mask, &mask) != 0 || !CPU_ISSET(cpu, &mask) ||
        CPU_COUNT(&mask) < threads_)
      return;
    CPU_CLR(cpu, &mask);
    for (auto& t : workers_) pthread_setaffinity_np(t.native_handle(), sizeof mask, &mask);
#endif
  }

  // Busy-waits while cond() holds, for at most `micros` (pause's latency differs 20x
  // between CPU generations, so the budget is in time, not iterations).
  template <typename Cond>
  static void spin_while(Cond cond, int micros) {
    if (micros <= 0) return;
    const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(micros);
    while (cond()) {
      for (int i = 0; i < 16; ++i) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      }
      if (std::chrono::steady_clock::now() > end) return;
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      stop_flag_.store(true);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::mutex call_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
  std::atomic<int64_t> n_chunks_{0};
  std::atomic<uint64_t> work_{kClosed};  // tag(generation) | next chunk index, or kClosed
  std::atomic<int64_t> done_{0};         // chunks of the current job finished
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_flag_{false};  // stop_, readable while spinning
  static constexpr int kJoinSpinMicros = 2000;
  int threads_ = 1;
  int placed_for_ = -1;  // the caller's CPU the workers were last kept off (-1: none yet)
  bool stop_ = false;
  static thread_local bool in_pool_;
};

thread_local bool Pool::in_pool_ = false;

// The process's pool, created on first use. fork() copies only the calling thread: the child
// inherits a Pool whose workers do not exist and whose mutexes another thread may have held at
// the fork, so the child handler abandons it (leaked: destroying it would join threads that are
// gone or lock those mutexes) and the next parallel_for in the child creates a fresh pool of the
// same size, as torch's and OpenMP's runtimes do. The handler only stores plain values.
std::atomic<Pool*> g_pool{nullptr};
std::atomic<int> g_spin_us{-1};  // -1: not read yet (QKERN_SPIN_US or kDefaultSpinMicros)
pthread_mutex_t g_create_mu = PTHREAD_MUTEX_INITIALIZER;
std::atomic<int> g_size{0};  // the size to (re)create with; 0 = the hardware threads

void after_fork_in_child() {
  g_pool.store(nullptr);
  g_create_mu = PTHREAD_MUTEX_INITIALIZER;  // it may have been locked by another thread
}

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return *p;
  pthread_mutex_lock(&g_create_mu);
  p = g_pool.load(std::memory_order_acquire);
  if (!p) {
    static const bool registered = pthread_atfork(nullptr, nullptr, after_fork_in_child) == 0;
    (void)registered;
    p = new Pool();  // leaked on purpose: no join races at interpreter exit
    int n = g_size.load();
    if (n == 0) n = hardware_threads();
    p->resize(n);
    g_pool.store(p, std::memory_order_release);
  }
  pthread_mutex_unlock(&g_create_mu);
  return *p;
}

}  // namespace

int spin_micros() {
  int v = g_spin_us.load(std::memory_order_relaxed);
  if (v < 0) {
    v = kDefaultSpinMicros;
    if (const char* env = std::getenv("QKERN_SPIN_US")) {
      char* end = nullptr;
      const long n = std::strtol(env, &end, 10);
      if (end != env && *end == '\0' && n >= 0 && n <= 1000000) v = static_cast<int>(n);
    }
    g_spin_us.store(v, std::memory_order_relaxed);
  }
  return v;
}

void set_spin_micros(int us) { g_spin_us.store(us < 0 ? 0 : (us > 1000000 ? 1000000 : us)); }

int hardware_threads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

int max_num_threads() { return kMaxThreadsPerHardwareThread * hardware_threads(); }

void pool_set_threads(int n) {
  n = n < 1 ? 1 : (n > max_num_threads() ? max_num_threads() : n);
  g_size.store(n);
  pool().resize(n);
}
int pool_threads() { return pool().threads(); }
void parallel_for(int64_t n_chunks, const std::function<void(int64_t)>& fn) {
  pool().run(n_chunks, fn);
}

void set_num_threads(int n) { pool_set_threads(n); }
int get_num_threads() { return pool_threads(); }

}  // namespace qk
