// Cache-line aligned std::vector storage for the buffers the kernels stream through (the AMX
// tile loads run at a third of their rate on rows that straddle two cache lines; `malloc`
// puts a multi-megabyte block 16 bytes past a page boundary).
#pragma once
#include <cstddef>
#include <new>
#include <vector>

namespace qk {

template <class T, std::size_t A = 64>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U, A>&) {}  // NOLINT: rebinding copies nothing
  template <class U>
  struct rebind {
    using other = AlignedAllocator<U, A>;
  };
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(A)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(A)); }
  friend bool operator==(const AlignedAllocator&, const AlignedAllocator&) { return true; }
  friend bool operator!=(const AlignedAllocator&, const AlignedAllocator&) { return false; }
};

template <class T>
using AlignedVector = std::vector<T, AlignedAllocator<T>>;

}  // namespace qk
