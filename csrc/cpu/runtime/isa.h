// Run-time ISA choice, shared by every kernel family. The CPU's support is read once (cpuid +
// OS support); the default is the highest ISA the CPU has. QKERN_ISA=scalar|avx2|avx512|amx|
// auto in the environment picks the starting level (the highest supported one <= it);
// QKERN_FORCE_SCALAR (any value but "" and "0") starts the process on the scalar path (it wins
// over QKERN_ISA); set_isa switches at run time (qkern.set_isa).
//
// The levels: avx2 = AVX2 + FMA + F16C; avx512 = that + AVX-512 F/BW/VL/DQ + VNNI (Cascade
// Lake, Ice Lake, Sapphire Rapids, Zen 4 and later; a Skylake-X without VNNI runs avx2).
// amx = the avx512 level + AMX-TILE + AMX-INT8 with the Linux kernel's permission to use the
// tile data (Sapphire Rapids and later); the families with an amx.cpp run their int8 products
// (and, where cpu_has_amx_bf16(), their float-activation W8A16 / FP8 / binary / ternary
// products: gemm/tile/bf16x3.h) on the tile unit there, the others their avx512 kernels.
// avx512.cpp translation units are compiled for exactly the avx512 set, amx.cpp for it plus
// AMX-TILE / AMX-INT8 (+ AMX-BF16 / AVX512_BF16 where the compiler has them). Elsewhere BF16
// and VBMI are extra: code using them carries
// __attribute__((target("avx512bf16"))) (or "avx512vbmi") and runs only when
// cpu_has_avx512_bf16() (cpu_has_avx512_vbmi()) says so. Each family keeps one table of
// function pointers per ISA (its kernels.h) and calls pick() on them for every call, so a
// switch takes effect at the next call.
#pragma once
#include <cstddef>

namespace qk {

enum Isa : int { kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaAmx = 3 };
bool cpu_has_avx2();    // what the CPU supports (cpuid + OS support)
bool cpu_has_avx512();  // AVX-512 F + BW + VL + DQ + VNNI (and AVX2); else the avx2 level
bool cpu_has_avx512_bf16();  // the avx512 level + AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16)
bool cpu_has_avx512_vbmi();  // the avx512 level + AVX512_VBMI (vpermb, vpmultishiftqb)
// The avx512 level + AMX-TILE + AMX-INT8, the OS saving the tile state (XCR0) and, on Linux,
// arch_prctl(ARCH_REQ_XCOMP_PERM) granting this process the tile data (asked once, here).
// False in a build whose compiler lacked the AMX flags (no amx.cpp was compiled).
bool cpu_has_amx();
// cpu_has_amx() + AMX-BF16 (tdpbf16ps) + AVX512_BF16, and a build whose compiler had their flags:
// the amx level's float-activation kernels (gemm/tile/bf16x3.h) run only where this says so.
bool cpu_has_amx_bf16();
Isa active_isa();       // what the kernels use now
void set_isa(Isa isa);  // the highest supported ISA <= isa

// The table of the running ISA from a family's tables, indexed by Isa: {&kScalarKernels,
// avx2_kernels(), ...}. An ISA whose entry is null (not built) or past the end falls back to the
// next lower one; entry 0, the scalar table, is never null.
template <class Table, std::size_t N>
const Table& pick(const Table* const (&by_isa)[N]) {
  for (std::size_t i = static_cast<std::size_t>(active_isa()); i > 0; --i)
    if (i < N && by_isa[i]) return *by_isa[i];
  return *by_isa[0];
}

}  // namespace qk
