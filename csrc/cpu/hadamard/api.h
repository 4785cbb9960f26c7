// Fast Walsh-Hadamard transform (FWHT): x <- H_n x / sqrt(n) for each row of a row-major
// (rows, n) float32 array, in place, with H_n the Sylvester Hadamard matrix
// (H_1 = [1], H_2k = [[H_k, H_k], [H_k, -H_k]]), so that the transform is orthogonal and its own
// inverse. n log2 n additions per row: stage h = 1, 2, 4, ..., n/2 replaces every pair
// (x[j], x[j + h]) (j mod 2h < h) by (x[j] + x[j + h], x[j] - x[j + h]); after the last stage
// every element is multiplied by float(1 / sqrt(n)). Every ISA performs these float operations
// in this order, so the scalar, AVX2 and AVX-512 paths agree bit for bit. Torch-free.
#pragma once
#include <cstdint>

namespace qk {

// true when n is a power of two (1, 2, 4, ...): the sizes fwht_f32 takes.
inline bool fwht_size_ok(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

// y = the transform of x; x, y: (rows, n) row-major float32, n a power of two (fwht_size_ok);
// x == y transforms in place, otherwise the two must not overlap. Rows are spread over the
// thread pool (each task copies its rows from x to y, then transforms them there while they are
// in cache); results do not depend on the thread count.
void fwht_f32(const float* x, float* y, int64_t rows, int64_t n);

}  // namespace qk
