// The current-ISA switch: cpuid detection, QKERN_FORCE_SCALAR and set_isa.
#include "cpu/runtime/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace qk {
namespace {

std::atomic<int> g_isa{-1};

Isa initial_isa() {
  const char* force = std::getenv("QKERN_FORCE_SCALAR");
  if (force && std::strcmp(force, "0") != 0 && force[0] != '\0') return kIsaScalar;
  Isa want = kIsaAvx512;  // QKERN_ISA: the highest level to start with (unknown names: auto)
  if (const char* env = std::getenv("QKERN_ISA")) {
    if (std::strcmp(env, "scalar") == 0) want = kIsaScalar;
    else if (std::strcmp(env, "avx2") == 0) want = kIsaAvx2;
  }
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

Isa active_isa() {
  int v = g_isa.load();
  if (v < 0) {
    v = initial_isa();
    g_isa.store(v);
  }
  return static_cast<Isa>(v);
}

void set_isa(Isa isa) {
  if (isa >= kIsaAvx512 && cpu_has_avx512()) g_isa.store(kIsaAvx512);
  else if (isa >= kIsaAvx2 && cpu_has_avx2()) g_isa.store(kIsaAvx2);
  else g_isa.store(kIsaScalar);
}

}  // namespace qk
