// Cache-line aligned std::vector storage for the buffers the kernels stream through (the AMX
// tile loads run at a third of their rate on rows that straddle two cache lines; `malloc`
// puts a multi-megabyte block 16 bytes past a page boundary).
#pragma once
#include <cstddef>
#include <new>
#include <vector>

namespace qk {

// The per-ISA translation units (CMakeLists.txt defines QK_ISA_UNIT for avx2.cpp, avx512.cpp,
// amx.cpp and their *_ forms) get vectors of their own: the allocator's tag is a type of the
// unit's anonymous namespace, so the vector member functions the unit instantiates, compiled
// with its ISA's instructions, have internal linkage. Otherwise the linker could keep such a
// copy of, say, std::vector<float>::resize for the whole library, and the scalar path would
// run AVX-512 instructions (tests/test_isa_symbols.py checks the object files).
#ifdef QK_ISA_UNIT
namespace {  // NOLINT(build/namespaces): one tag per per-ISA translation unit, on purpose
struct IsaUnitTag {};
}  // namespace
using VectorTag = IsaUnitTag;
#else
using VectorTag = void;
#endif

template <class T, std::size_t A = 64, class Tag = VectorTag>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U, A, Tag>&) {}  // NOLINT: rebinding copies nothing
  template <class U>
  struct rebind {
    using other = AlignedAllocator<U, A, Tag>;
  };
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(A)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(A)); }
  friend bool operator==(const AlignedAllocator&, const AlignedAllocator&) { return true; }
  friend bool operator!=(const AlignedAllocator&, const AlignedAllocator&) { return false; }
};

// The vector for kernel buffers, in every translation unit (per-ISA ones: their own, above).
template <class T>
using AlignedVector = std::vector<T, AlignedAllocator<T>>;

}  // namespace qk
