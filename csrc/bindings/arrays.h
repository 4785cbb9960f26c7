// Output and weight arrays for the bindings. Arrays of 4 MiB and more get 2 MiB-aligned memory
// with transparent huge pages requested: a GEMV streams its packed weights once per call and
// 4 KiB pages cost it ~20 % in TLB misses, and first-touch page faults of big outputs otherwise
// cost about as much as the kernels themselves.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <sys/mman.h>

#include <cstdlib>
#include <new>
#include <vector>

#include "bindings/checked.h"

namespace qk {
namespace bind {

template <typename T>
pybind11::array_t<T> new_array(std::vector<pybind11::ssize_t> shape) {
  int64_t elems = 1;
  for (auto d : shape) elems = checked_mul(elems, static_cast<int64_t>(d), "new_array");
  const size_t n = static_cast<size_t>(checked_mul(elems, sizeof(T), "new_array (bytes)")) /
                   sizeof(T);
  constexpr size_t kHuge = size_t{2} << 20;
  if (n * sizeof(T) < 2 * kHuge) return pybind11::array_t<T>(shape);
  const size_t bytes = (n * sizeof(T) + kHuge - 1) / kHuge * kHuge;
  void* p = nullptr;
  if (posix_memalign(&p, kHuge, bytes) != 0) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  madvise(p, bytes, MADV_HUGEPAGE);
#endif
  pybind11::capsule owner(p, [](void* q) { std::free(q); });
  return pybind11::array_t<T>(shape, static_cast<T*>(p), owner);
}

}  // namespace bind
}  // namespace qk
