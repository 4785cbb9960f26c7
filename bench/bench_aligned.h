// Zeroed buffers on a 64-byte line, as torch allocates tensors, for the google-benchmark
// binaries. A std::vector's data of this size sits 16 bytes past a page: that keeps the kernels
// off their streaming-store path, and splits every 64-byte row the AMX kernel loads across two
// cache lines.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

template <typename T = float>
std::shared_ptr<T> aligned_buffer(int64_t n) {
  const auto bytes = static_cast<size_t>((n * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return std::shared_ptr<T>(static_cast<T*>(p), std::free);
}
