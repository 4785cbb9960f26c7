// The current-ISA switch: cpuid detection (and the AMX permission), QKERN_FORCE_SCALAR and
// set_isa.
#include "cpu/runtime/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace qk {
namespace {

std::atomic<int> g_isa{-1};

Isa initial_isa() {
  const char* force = std::getenv("QKERN_FORCE_SCALAR");
  if (force && std::strcmp(force, "0") != 0 && force[0] != '\0') return kIsaScalar;
  Isa want = kIsaAmx;  // QKERN_ISA: the highest level to start with (unknown names: auto)
  if (const char* env = std::getenv("QKERN_ISA")) {
    if (std::strcmp(env, "scalar") == 0) want = kIsaScalar;
    else if (std::strcmp(env, "avx2") == 0) want = kIsaAvx2;
    else if (std::strcmp(env, "avx512") == 0) want = kIsaAvx512;
  }
  if (want >= kIsaAmx && cpu_has_amx()) return kIsaAmx;
  if (want >= kIsaAvx512 && cpu_has_avx512()) return kIsaAvx512;
  if (want >= kIsaAvx2 && cpu_has_avx2()) return kIsaAvx2;
  return kIsaScalar;
}

}  // namespace

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool cpu_has_avx512_vbmi() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vbmi");
#else
  return false;
#endif
}

#if defined(__x86_64__) && defined(QK_HAVE_AMX)
namespace {

// What cpu_has_amx() says, computed once: cpuid leaf 7 EDX bits 24 (AMX-TILE) and 25
// (AMX-INT8), XCR0 bits 17-18 (the OS saves XTILECFG / XTILEDATA), then Linux's per-process
// permission for XTILEDATA (feature 18), which it refuses where a signal stack is too small.
bool amx_usable() {
  if (!cpu_has_avx512()) return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 24) & 1) || !((d >> 25) & 1)) return false;
  unsigned lo = 0, hi = 0;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;  // other systems: not wired up
#endif
}

}  // namespace
#endif

bool cpu_has_amx() {
#if defined(__x86_64__) && defined(QK_HAVE_AMX)  // QK_HAVE_AMX: the amx.cpp files were built
  static const bool usable = amx_usable();
  return usable;
#else
  return false;
#endif
}

bool cpu_has_amx_bf16() {
#if defined(__x86_64__) && defined(QK_HAVE_AMX_BF16)
  static const bool usable = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return cpu_has_amx() && cpu_has_avx512_bf16() && __get_cpuid_count(7, 0, &a, &b, &c, &d) &&
           ((d >> 22) & 1);  // AMX-BF16
  }();
  return usable;
#else
  return false;
#endif
}

Isa active_isa() {
  int v = g_isa.load();
  if (v < 0) {
    v = initial_isa();
    g_isa.store(v);
  }
  return static_cast<Isa>(v);
}

void set_isa(Isa isa) {
  if (isa >= kIsaAmx && cpu_has_amx()) g_isa.store(kIsaAmx);
  else if (isa >= kIsaAvx512 && cpu_has_avx512()) g_isa.store(kIsaAvx512);
  else if (isa >= kIsaAvx2 && cpu_has_avx2()) g_isa.store(kIsaAvx2);
  else g_isa.store(kIsaScalar);
}

}  // namespace qk
