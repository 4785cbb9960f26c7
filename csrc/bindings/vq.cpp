// Bindings of the VQ kernels (csrc/cpu/vq/api.h): size and null-pointer checks, GIL release.
// python/qkern/vq/search.py checks the numpy arrays (dtype, shape, contiguity, code ranges)
// and passes their addresses.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "bindings/checked.h"
#include "bindings/registry.h"
#include "cpu/vq/api.h"

namespace py = pybind11;

namespace {

using qk::bind::nonnull;

void positive(int64_t v, const char* what) {
  if (v <= 0) throw py::value_error(std::string(what) + " must be positive, got " +
                                    std::to_string(v));
}

void init(py::module_& m) {
  // codes: int64 when codes64 else int32; dist: float32 (n).
  m.def("vq_assign_raw", [](uintptr_t x, int64_t n, int64_t d, uintptr_t c, int64_t k,
                            uintptr_t codes, bool codes64, uintptr_t dist) {
    positive(d, "vq_assign: d");
    positive(k, "vq_assign: k");
    qk::bind::checked_mul(n, d, "vq_assign n x d");
    qk::bind::checked_mul(k, d, "vq_assign k x d");
    if (k > INT32_MAX)
      throw py::value_error("vq_assign: k must be < 2^31, got " + std::to_string(k));
    if (n == 0) return;
    nonnull({x, c, codes, dist}, "vq_assign_raw");
    const auto* xp = reinterpret_cast<const float*>(x);
    const auto* cp = reinterpret_cast<const float*>(c);
    auto* dp = reinterpret_cast<float*>(dist);
    py::gil_scoped_release nogil;
    if (codes64)
      qk::vq_assign(xp, n, d, cp, k, reinterpret_cast<int64_t*>(codes), dp);
    else
      qk::vq_assign(xp, n, d, cp, k, reinterpret_cast<int32_t*>(codes), dp);
  });
  // idx (n, kk) int64, dist (n, kk) float32; 1 <= kk <= k.
  m.def("vq_topk_raw", [](uintptr_t x, int64_t n, int64_t d, uintptr_t c, int64_t k, int64_t kk,
                          uintptr_t idx, uintptr_t dist) {
    positive(d, "vq_topk: d");
    positive(k, "vq_topk: k");
    if (kk <= 0 || kk > k)
      throw py::value_error("vq_topk: kk must lie in 1.." + std::to_string(k) + ", got " +
                            std::to_string(kk));
    qk::bind::checked_mul(n, d, "vq_topk n x d");
    qk::bind::checked_mul(n, kk, "vq_topk n x kk");
    qk::bind::checked_mul(k, d, "vq_topk k x d");
    if (n == 0) return;
    nonnull({x, c, idx, dist}, "vq_topk_raw");
    py::gil_scoped_release nogil;
    qk::vq_topk(reinterpret_cast<const float*>(x), n, d, reinterpret_cast<const float*>(c), k,
                kk, reinterpret_cast<int64_t*>(idx), reinterpret_cast<float*>(dist));
  });
  // values (n, len) float32, idx (n, kk) int64; 1 <= kk <= len.
  m.def("vq_topk_rows_raw", [](uintptr_t values, int64_t n, int64_t len, int64_t kk,
                               uintptr_t idx) {
    positive(len, "vq_topk_rows: len");
    if (kk <= 0 || kk > len)
      throw py::value_error("vq_topk_rows: kk must lie in 1.." + std::to_string(len) + ", got " +
                            std::to_string(kk));
    qk::bind::checked_mul(n, len, "vq_topk_rows n x len");
    if (n == 0) return;
    nonnull({values, idx}, "vq_topk_rows_raw");
    py::gil_scoped_release nogil;
    qk::vq_topk_rows(reinterpret_cast<const float*>(values), n, len, kk,
                     reinterpret_cast<int64_t*>(idx));
  });
  // books (m, k, d) float32, cross (k * k * m * (m - 1) / 2) float32.
  m.def("rq_cross_table_raw", [](uintptr_t books, int64_t m_, int64_t k, int64_t d,
                                 uintptr_t cross) {
    positive(m_, "rq_cross_table: m");
    positive(k, "rq_cross_table: k");
    positive(d, "rq_cross_table: d");
    qk::bind::checked_mul(qk::bind::checked_mul(m_, k, "rq_cross_table m x k"), d,
                          "rq_cross_table m x k x d");
    qk::bind::checked_mul(qk::bind::checked_mul(k, k, "rq_cross_table k x k"), m_ * m_,
                          "rq_cross_table table size");
    nonnull({books, cross}, "rq_cross_table_raw");
    py::gil_scoped_release nogil;
    qk::rq_cross_table(reinterpret_cast<const float*>(books), m_, k, d,
                       reinterpret_cast<float*>(cross));
  });
  // x (n, d), books (m, k, d), cross (rq_cross_table) float32; codes (n, m) int64; beam >= 1.
  m.def("rq_beam_encode_raw", [](uintptr_t x, int64_t n, int64_t d, uintptr_t books,
                                 int64_t m_, int64_t k, uintptr_t cross, int64_t beam,
                                 uintptr_t codes) {
    positive(d, "rq_beam_encode: d");
    positive(m_, "rq_beam_encode: m");
    positive(k, "rq_beam_encode: k");
    positive(beam, "rq_beam_encode: beam");
    qk::bind::checked_mul(n, d, "rq_beam_encode n x d");
    qk::bind::checked_mul(n, m_, "rq_beam_encode n x m");
    qk::bind::checked_mul(qk::bind::checked_mul(m_, k, "rq_beam_encode m x k"), d,
                          "rq_beam_encode m x k x d");
    qk::bind::checked_mul(beam, m_, "rq_beam_encode beam x m");
    if (n == 0) return;
    nonnull({x, books, codes}, "rq_beam_encode_raw");
    if (m_ > 1) nonnull({cross}, "rq_beam_encode_raw");
    py::gil_scoped_release nogil;
    qk::rq_beam_encode(reinterpret_cast<const float*>(x), n, d,
                       reinterpret_cast<const float*>(books), m_, k,
                       reinterpret_cast<const float*>(cross), beam,
                       reinterpret_cast<int64_t*>(codes));
  });
  // x (n, d), books (m, k, d), cross (rq_cross_table) float32; codes (n, m) int64 in place,
  // each < k (checked by the caller). ils_iters < 0: plain ICM; else ILS with the perturbations
  // book / code (ils_iters, n, nperts) int32 (book < m, code < k: the caller draws them).
  m.def("icm_encode_raw", [](uintptr_t x, int64_t n, int64_t d, uintptr_t books, int64_t m_,
                             int64_t k, uintptr_t cross, int64_t icm_iters, int64_t ils_iters,
                             int64_t nperts, uintptr_t book, uintptr_t code, uintptr_t codes) {
    positive(d, "icm_encode: d");
    positive(m_, "icm_encode: m");
    positive(k, "icm_encode: k");
    if (icm_iters < 0)
      throw py::value_error("icm_encode: icm_iters must be >= 0, got " +
                            std::to_string(icm_iters));
    qk::bind::checked_mul(n, d, "icm_encode n x d");
    qk::bind::checked_mul(n, m_, "icm_encode n x m");
    qk::bind::checked_mul(qk::bind::checked_mul(m_, k, "icm_encode m x k"), d,
                          "icm_encode m x k x d");
    qk::bind::checked_mul(qk::bind::checked_mul(k, k, "icm_encode k x k"), m_ * m_,
                          "icm_encode table size");
    if (ils_iters >= 0) {
      if (nperts < 1 || nperts > m_)
        throw py::value_error("icm_encode: nperts must lie in 1.." + std::to_string(m_) +
                              ", got " + std::to_string(nperts));
      qk::bind::checked_mul(qk::bind::checked_mul(ils_iters, n, "icm_encode ils_iters x n"),
                            nperts, "icm_encode perturbations");
    }
    if (n == 0) return;
    nonnull({x, books, codes}, "icm_encode_raw");
    if (m_ > 1) nonnull({cross}, "icm_encode_raw");
    if (ils_iters > 0) nonnull({book, code}, "icm_encode_raw");
    const auto* xp = reinterpret_cast<const float*>(x);
    const auto* bp = reinterpret_cast<const float*>(books);
    const auto* cp = reinterpret_cast<const float*>(cross);
    auto* out = reinterpret_cast<int64_t*>(codes);
    py::gil_scoped_release nogil;
    if (ils_iters < 0)
      qk::icm_encode(xp, n, d, bp, m_, k, cp, icm_iters, out);
    else
      qk::ils_encode(xp, n, d, bp, m_, k, cp, icm_iters, ils_iters, nperts,
                     reinterpret_cast<const int32_t*>(book),
                     reinterpret_cast<const int32_t*>(code), out);
  });
  // x (n, m * dsub), codebooks (m, ksub, dsub) float32, codes (n, m) int64.
  m.def("pq_encode_raw", [](uintptr_t x, int64_t n, int64_t m_, int64_t ksub, int64_t dsub,
                            uintptr_t cb, uintptr_t codes) {
    positive(m_, "pq_encode: m");
    positive(ksub, "pq_encode: ksub");
    positive(dsub, "pq_encode: dsub");
    if (ksub > INT32_MAX)
      throw py::value_error("pq_encode: ksub must be < 2^31, got " + std::to_string(ksub));
    const int64_t d = qk::bind::checked_mul(m_, dsub, "pq_encode m x dsub");
    qk::bind::checked_mul(qk::bind::checked_mul(m_, ksub, "pq_encode m x ksub"), dsub,
                          "pq_encode m x ksub x dsub");
    qk::bind::checked_mul(n, d, "pq_encode n x d");
    if (n == 0) return;
    nonnull({x, cb, codes}, "pq_encode_raw");
    py::gil_scoped_release nogil;
    qk::pq_encode(reinterpret_cast<const float*>(x), n, m_, ksub, dsub,
                  reinterpret_cast<const float*>(cb), reinterpret_cast<int64_t*>(codes));
  });
  // q (nq, m * dsub), codebooks (m, ksub, dsub), table (nq, m, ksub): float32.
  m.def("pq_adc_table_raw", [](uintptr_t q, int64_t nq, int64_t m_, int64_t ksub, int64_t dsub,
                               uintptr_t cb, uintptr_t table) {
    positive(m_, "pq_adc_table: m");
    positive(ksub, "pq_adc_table: ksub");
    positive(dsub, "pq_adc_table: dsub");
    qk::bind::checked_mul(qk::bind::checked_mul(m_, ksub, "pq_adc_table m x ksub"), dsub,
                          "pq_adc_table m x ksub x dsub");
    qk::bind::checked_mul(qk::bind::checked_mul(nq, m_, "pq_adc_table nq x m"),
                          std::max(ksub, dsub), "pq_adc_table nq x m x ksub");
    if (nq == 0) return;
    nonnull({q, cb, table}, "pq_adc_table_raw");
    py::gil_scoped_release nogil;
    qk::pq_adc_table(reinterpret_cast<const float*>(q), nq, m_, ksub, dsub,
                     reinterpret_cast<const float*>(cb), reinterpret_cast<float*>(table));
  });
  // table (nq, m, ksub) float32, codes (n, m) of code_bytes (1: uint8, 2: uint16), each code
  // < ksub (checked by the caller), dist (nq, n) float32.
  m.def("pq_adc_scan_raw", [](uintptr_t table, int64_t nq, int64_t ksub, uintptr_t codes,
                              int64_t n, int64_t m_, int code_bytes, uintptr_t dist) {
    positive(m_, "pq_adc_scan: m");
    positive(ksub, "pq_adc_scan: ksub");
    if (code_bytes != 1 && code_bytes != 2)
      throw py::value_error("pq_adc_scan: code_bytes must be 1 (uint8) or 2 (uint16), got " +
                            std::to_string(code_bytes));
    qk::bind::checked_mul(n, m_, "pq_adc_scan n x m");
    qk::bind::checked_mul(nq, n, "pq_adc_scan nq x n");
    qk::bind::checked_mul(qk::bind::checked_mul(nq, m_, "pq_adc_scan nq x m"), ksub,
                          "pq_adc_scan nq x m x ksub");
    if (nq == 0 || n == 0) return;
    nonnull({table, codes, dist}, "pq_adc_scan_raw");
    const auto* tp = reinterpret_cast<const float*>(table);
    auto* dp = reinterpret_cast<float*>(dist);
    py::gil_scoped_release nogil;
    if (code_bytes == 1)
      qk::pq_adc_scan(tp, nq, ksub, reinterpret_cast<const uint8_t*>(codes), n, m_, dp);
    else
      qk::pq_adc_scan(tp, nq, ksub, reinterpret_cast<const uint16_t*>(codes), n, m_, dp);
  });
}

qk::bind::Register reg(init);

}  // namespace
