// A small persistent thread pool: parallel_for over chunk indices, the calling thread taking
// part. Sized by qk::set_num_threads; nested calls run inline so work is never oversubscribed.
#pragma once
#include <cstdint>
#include <functional>

namespace qk {

// Public API (qkern.set_num_threads): the pool's size.
void set_num_threads(int n);  // n >= 1
int get_num_threads();

void pool_set_threads(int n);
int pool_threads();

// Calls fn(i) for every i in [0, n_chunks), spread over the pool's threads.
void parallel_for(int64_t n_chunks, const std::function<void(int64_t)>& fn);

}  // namespace qk
