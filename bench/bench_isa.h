// The ISA levels the google-benchmark binaries run: every level the CPU has, or only
// QKERN_BENCH_ISA=scalar|avx2|avx512|amx when that is set in the environment. The amx level
// only for the families with an AMX kernel (with_amx): the others would rerun their avx512 one.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/runtime/isa.h"

inline std::vector<int64_t> bench_isas(bool with_amx = false) {
  std::vector<int64_t> out{qk::kIsaScalar};
  if (qk::cpu_has_avx2()) out.push_back(qk::kIsaAvx2);
  if (qk::cpu_has_avx512()) out.push_back(qk::kIsaAvx512);
  if (with_amx && qk::cpu_has_amx()) out.push_back(qk::kIsaAmx);
  if (const char* only = std::getenv("QKERN_BENCH_ISA")) {
    const int64_t want = std::strcmp(only, "scalar") == 0 ? qk::kIsaScalar
                         : std::strcmp(only, "avx2") == 0 ? qk::kIsaAvx2
                         : std::strcmp(only, "amx") == 0  ? qk::kIsaAmx
                                                          : qk::kIsaAvx512;
    std::vector<int64_t> one;
    for (int64_t i : out)
      if (i == want) one.push_back(i);
    return one;
  }
  return out;
}
