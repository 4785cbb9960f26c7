// Vector-quantization kernels (qkern.vq): nearest-centroid search (k-means assignment, VQ
// encoding) and asymmetric distance computation (ADC) for product quantization. Torch-free.
//
// vq_assign: for each row x_i of x (n, d) the index of the nearest row of centroids (k, d) in
// squared L2 and that distance. It is computed as FAISS does, through the expansion
//   ||x - c||^2 = ||x||^2 + (||c||^2 - 2 x.c),
// the centroid norms once per call, the dot products as a small register-blocked GEMM (blocks
// of x rows against panels of 16 centroids), the argmin fused behind it. Float contract, the
// same on every ISA (bit-identical: each dot product and norm is the sequential float32 sum
// over t = 0..d-1 of the products x[t] * c[t], mul then add, no FMA):
//   s_j = x.c_j,  v_j = ||c_j||^2 - 2 s_j,  code = the lowest j with the smallest v_j,
//   dist = max(0, ||x||^2 + v_code).
// The expansion cancels: dist carries an absolute error of a few ulp of ||x||^2 + ||c||^2
// (about d * 2^-24 (||x||^2 + ||c||^2)), not of the distance itself, so a small distance
// between large vectors is only accurate to that bound (it is clamped at >= 0, as FAISS does),
// and two centroids whose distances differ by less than it may be ranked either way.
//
// vq_topk: for each row of x the kk nearest centroids (kk <= k) by the same values as
// vq_assign, ascending (equal values: the lower index first): idx (n, kk) and dist (n, kk),
// dist = max(0, ||x||^2 + v). Its first column is vq_assign's result. Bit-identical on every
// ISA (the register-blocked GEMM of vq_assign with a small sorted list per row instead of the
// argmin).
//
// vq_topk_rows: for each row of values (n, len) the positions of its kk smallest entries
// (kk <= len), ascending by value, equal values by position (the beam selection of a residual
// quantizer's search); idx (n, kk). Plain comparisons: the same on every ISA.
//
// pq_encode: the product-quantization codes of x (n, m * dsub): codes[i, j] (n, m) = the
// vq_assign code of the j-th sub-vector x[i, j * dsub : (j + 1) * dsub] among the ksub rows of
// codebooks[j] (m, ksub, dsub) (the same values and ties, without the distances); one call
// for all m sub-quantizers, read in place (no sub-vector copies).
//
// pq_adc_table: for each query (nq, m * dsub) and sub-quantizer j, the squared distance of the
// query's j-th sub-vector to every sub-centroid of codebooks (m, ksub, dsub):
//   table[q, j, c] = sum_{t < dsub} (q[j * dsub + t] - cb[j, c, t])^2   (sequential, float32)
// pq_adc_scan: dist[q, i] = sum_{j < m} table[q, j, codes[i, j]] (sequential over j, float32),
// codes (n, m) uint8 or uint16, every code < ksub (the caller checks). Both are bit-identical
// on every ISA.
//
// rq_cross_table: the codeword cross products of a residual quantizer's codebooks (m, K, d),
// for s = 1..m-1 a block of (s * K, K) at offset K * K * s * (s - 1) / 2:
//   cross[s][j * K + a][c] = books[j][a] . books[s][c]   (j < s; the dot products of vq_assign)
// rq_beam_encode: the residual codes (n, m) of x (n, d) by a beam search of width beam without
// residuals (FAISS's beam look-up tables): with D(x, p) the value of a partial code p, stage s
// offers every (parent b, codeword c) of the kept parents the value
//   (D_b + (||c||^2 - 2 x.c)) + 2 * (sum over j < s, in order, of cross[s][j*K + p_b[j]][c])
// (= ||x - sum_j books[j][p_b[j]] - c||^2 up to rounding; D = ||x||^2 for the empty code) and
// keeps the beam smallest, ascending, equal values by (b, c) (the earlier parent first); the
// codes are the first kept entry after stage m - 1. Bit-identical on every ISA (the values are
// float32 sums in the order above).
//
// icm_encode: iterated conditional modes for additive codebooks (m, K, d) (FAISS's
// LocalSearchQuantizer icm_encode_step) from look-up tables, codes (n, m) in place: the unary
// terms U[j][c] = ||c_jc||^2 - 2 x.c_jc (the norms and dot products of vq_assign, once per
// vector) and the pair terms <c_ia, c_jc> read from cross (rq_cross_table of the same books;
// rows with i > j come from its transposed blocks, built per call). A sweep takes j = 0..m-1
// in turn and sets b_j to the lowest c with the smallest
//   U[j][c] + 2 * s_c,  s_c = (((0 + P_i0[c]) + P_i1[c]) + ...)  (float32, i = 0..m-1, i != j,
//   ascending; P_i[c] = <c_{i b_i}, c_jc>, the current b_i: earlier codebooks already moved)
// (= ||x - sum_{i != j} c_{i b_i} - c_jc||^2 less terms independent of c, up to rounding;
// U[j][c] = ||c||^2 - 2 (x.c) in float32, x2 exact). The scan in c ascending replaces the
// running best (start: +inf, entry 0) only when strictly smaller: ties to the lowest c, NaN
// never chosen, no value below +inf keeps entry 0. Up to icm_iters sweeps per vector; a
// vector stops after a sweep that changed nothing (a fixed point: the next sweep would see the
// same values).
// ils_encode: iterated local search on icm_encode's sweeps, per vector: best = ICM(start), the
// start kept if its float64 error is lower; then ils_iters rounds of (cand = best with
// cand[pert_book[o + p]] = pert_code[o + p] for p = 0..nperts-1 in order, o = (r n + i) nperts,
// the perturbations (ils_iters, n, nperts) drawn by the caller; ICM(cand); best = cand where
// its float64 error is strictly lower). The float64 error: sum over t in order of
// (x_t - sum_j c_{j b_j}[t])^2, the reconstruction summed in codebook order.
// All spread their rows over the thread pool; results do not depend on the thread count, and
// every ISA gives the same bits.
#pragma once
#include <cstdint>

namespace qk {

void vq_assign(const float* x, int64_t n, int64_t d, const float* centroids, int64_t k,
               int64_t* codes, float* dist);
void vq_assign(const float* x, int64_t n, int64_t d, const float* centroids, int64_t k,
               int32_t* codes, float* dist);

void vq_topk(const float* x, int64_t n, int64_t d, const float* centroids, int64_t k, int64_t kk,
             int64_t* idx, float* dist);
void vq_topk_rows(const float* values, int64_t n, int64_t len, int64_t kk, int64_t* idx);

void pq_encode(const float* x, int64_t n, int64_t m, int64_t ksub, int64_t dsub,
               const float* codebooks, int64_t* codes);

void pq_adc_table(const float* q, int64_t nq, int64_t m, int64_t ksub, int64_t dsub,
                  const float* codebooks, float* table);

void pq_adc_scan(const float* table, int64_t nq, int64_t ksub, const uint8_t* codes, int64_t n,
                 int64_t m, float* dist);
void pq_adc_scan(const float* table, int64_t nq, int64_t ksub, const uint16_t* codes,
                 int64_t n, int64_t m, float* dist);

void rq_cross_table(const float* books, int64_t m, int64_t k, int64_t d, float* cross);
void rq_beam_encode(const float* x, int64_t n, int64_t d, const float* books, int64_t m,
                    int64_t k, const float* cross, int64_t beam, int64_t* codes);

void icm_encode(const float* x, int64_t n, int64_t d, const float* books, int64_t m, int64_t k,
                const float* cross, int64_t icm_iters, int64_t* codes);
void ils_encode(const float* x, int64_t n, int64_t d, const float* books, int64_t m, int64_t k,
                const float* cross, int64_t icm_iters, int64_t ils_iters, int64_t nperts,
                const int32_t* pert_book, const int32_t* pert_code, int64_t* codes);

}  // namespace qk
