// gemm_vq entry point (api.h): the table / lanes algorithm over blocks of 16 rows, tasks of
// whole blocks on the thread pool (each output computed by one task, the same way whatever
// the split), the segment scales applied here (shared by every ISA).
#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/gemm/vq/kernels.h"
#include "cpu/runtime/prefetch.h"
#include "cpu/runtime/threadpool.h"

namespace qk {
namespace {

constexpr int64_t kLutFloats = 4096;                // one x row's look-up tile: 16 KiB
constexpr int64_t kMinParallel = int64_t{1} << 16;  // weights below which one thread runs
constexpr int64_t kAheadBlocks = 4;  // the table path prefetches this many blocks ahead

template <class Code>
struct Call {
  const float* x;
  int64_t m;
  const Code* packed;
  int64_t n, nv;
  const float* books;
  int64_t groups, kc, dim, group_rows;
  const float* scales;
  int64_t nseg;
  const float* bias;
  float* y;
  std::vector<float> bookt;  // table path: (groups, dim, kc)
};

// acc = acc + s * part for the 16 rows of block b, segment s (rows past n: nothing added).
template <class Code>
void add_scaled(const Call<Code>& c, int64_t b, int64_t seg, const float* part, float* acc) {
  for (int64_t l = 0; l < kVqRows; ++l) {
    const int64_t r = b * kVqRows + l;
    if (r < c.n) acc[l] = acc[l] + c.scales[r * c.nseg + seg] * part[l];
  }
}

template <class Code>
void store(const Call<Code>& c, int64_t b, int64_t i, const float* acc) {
  for (int64_t l = 0; l < kVqRows; ++l) {
    const int64_t r = b * kVqRows + l;
    if (r < c.n) c.y[i * c.n + r] = c.bias ? acc[l] + c.bias[r] : acc[l];
  }
}

// Runs block_task(b0, b1) over `tasks` equal shares of the nb blocks (inline for one task),
// then raises std::invalid_argument naming `op` when a task read a code >= kc.
template <class F>
void run_blocks(const char* op, int64_t kc, int64_t nb, int64_t tasks, F block_task) {
  std::vector<uint32_t> tops(static_cast<size_t>(tasks), 0);
  auto task = [&](int64_t t) { tops[t] = block_task(nb * t / tasks, nb * (t + 1) / tasks); };
  if (tasks == 1)
    task(0);
  else
    parallel_for(tasks, task);
  const uint32_t top = *std::max_element(tops.begin(), tops.end());
  if (top >= static_cast<uint64_t>(kc))
    throw std::invalid_argument(std::string(op) + ": code " + std::to_string(top) +
                                " is out of range for a codebook of " + std::to_string(kc) +
                                " entries");
}

// Block b's codes from vector v on (v a multiple of 8 for Nib4), and the bytes of nvt vectors.
template <class Code>
const Code* codes_at(const Call<Code>& c, int64_t b, int64_t v) {
  if constexpr (std::is_same_v<Code, vqmm::Nib4>)
    return c.packed + (b * ((c.nv + 7) / 8) + v / 8) * kVqRows;
  else
    return c.packed + (b * c.nv + v) * kVqRows;
}

template <class Code>
int64_t codes_bytes(int64_t nvt) {
  if constexpr (std::is_same_v<Code, vqmm::Nib4>)
    return (nvt + 7) / 8 * kVqRows * 4;
  else
    return nvt * kVqRows * int64_t{sizeof(Code)};
}

// A segment's sum from its four chains (api.h): part = (P0 + P1) + (P2 + P3), then added to
// acc (times the segment's scale when there are scales); the chains are zeroed for the next.
template <class Code>
void finish_segment(const Call<Code>& c, int64_t b, int64_t seg, float* chains, float* acc) {
  float part[kVqRows];
  for (int64_t l = 0; l < kVqRows; ++l)
    part[l] = (chains[l] + chains[kVqRows + l]) + (chains[2 * kVqRows + l] +
                                                    chains[3 * kVqRows + l]);
  if (c.scales)
    add_scaled(c, b, seg, part, acc);
  else
    for (int64_t l = 0; l < kVqRows; ++l) acc[l] = acc[l] + part[l];
  std::fill(chains, chains + 4 * kVqRows, 0.0f);
}

// The table path over blocks [b0, b1): per codebook group, per segment, per tile of vectors.
template <class Code>
uint32_t table_task(const Call<Code>& c, int64_t b0, int64_t b1) {
  const auto& kern = vqmm::kernels();
  const auto& ck = kern.template of<Code>();
  const int64_t spv = c.nv / c.nseg, m = c.m, kc = c.kc;
  int64_t tile = std::max<int64_t>(1, std::min(spv, kLutFloats / kc));
  if constexpr (std::is_same_v<Code, vqmm::Nib4>) tile = std::max<int64_t>(8, tile / 8 * 8);
  // a codebook per one or two blocks: the table in registers (same bits, no table stored)
  const bool fused = c.groups > 1 && c.group_rows <= 2 * kVqRows && kc <= kern.fused_kc &&
                     (c.dim == 1 || c.dim == 2 || c.dim == 4 || c.dim == 8);
  std::vector<float> lut(fused ? 0 : static_cast<size_t>(m * tile * kc));
  uint32_t top = 0;
  for (int64_t b = b0; b < b1;) {
    const int64_t g = c.groups == 1 ? 0 : b * kVqRows / c.group_rows;
    const int64_t end = c.groups == 1 ? b1 : std::min(b1, (g + 1) * c.group_rows / kVqRows);
    const int64_t nbk = end - b;
    std::vector<float> acc(static_cast<size_t>(nbk * m * kVqRows), 0.0f);
    std::vector<float> chains(4 * acc.size(), 0.0f);
    const float* bt = c.bookt.data() + g * c.dim * kc;
    for (int64_t s = 0; s < c.nseg; ++s) {
      for (int64_t v0 = s * spv; v0 < (s + 1) * spv; v0 += tile) {
        const int64_t nvt = std::min(tile, (s + 1) * spv - v0);
        for (int64_t i = 0; i < m && !fused; ++i)
          kern.build(c.x + i * c.nv * c.dim + v0 * c.dim, nvt, c.dim, bt, kc,
                     lut.data() + i * tile * kc);
        for (int64_t bb = b; bb < end; ++bb) {
          const Code* codes = codes_at(c, bb, v0);
          // the tile's codes of a later block: rows of blocks lie nv * 16 codes apart, a
          // stride the hardware prefetchers do not follow
          if (bb + kAheadBlocks < end) {
            const auto* next = reinterpret_cast<const uint8_t*>(codes_at(c, bb + kAheadBlocks,
                                                                         v0));
            for (int64_t o = 0; o < codes_bytes<Code>(nvt); o += 64) prefetch_l2(next, o);
          }
          for (int64_t i = 0; i < m; ++i) {
            float* ch = chains.data() + ((bb - b) * m + i) * 4 * kVqRows;
            const uint32_t t =
                fused ? ck.fused(c.x + (i * c.nv + v0) * c.dim, nvt, c.dim, bt, kc, codes, v0, ch)
                      : ck.acc(lut.data() + i * tile * kc, kc, nvt, codes, v0, ch);
            top = std::max(top, t);
          }
        }
      }
      for (int64_t bb = b; bb < end; ++bb)
        for (int64_t i = 0; i < m; ++i) {
          const int64_t o = (bb - b) * m + i;
          finish_segment(c, bb, s, chains.data() + o * 4 * kVqRows, acc.data() + o * kVqRows);
        }
    }
    for (int64_t bb = b; bb < end; ++bb)
      for (int64_t i = 0; i < m; ++i) store(c, bb, i, acc.data() + ((bb - b) * m + i) * kVqRows);
    b = end;
  }
  return top;
}

// The lanes path over blocks [b0, b1): each lane its own row's codebook.
template <class Code>
uint32_t lane_task(const Call<Code>& c, int64_t b0, int64_t b1) {
  const auto& kern = vqmm::kernels();
  const auto& ck = kern.template of<Code>();
  const int64_t spv = c.nv / c.nseg;
  uint32_t top = 0;
  int32_t base[kVqRows];
  float acc[kVqRows], chains[4 * kVqRows] = {};
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t l = 0; l < kVqRows; ++l) {
      const int64_t r = std::min(b * kVqRows + l, c.n - 1);
      base[l] = static_cast<int32_t>(r / c.group_rows * c.kc * c.dim);
    }
    const Code* codes = c.packed + b * c.nv * kVqRows;
    for (int64_t i = 0; i < c.m; ++i) {
      const float* x = c.x + i * c.nv * c.dim;
      std::fill(acc, acc + kVqRows, 0.0f);
      for (int64_t s = 0; s < c.nseg; ++s) {
        top = std::max(top, ck.lane(x + s * spv * c.dim, spv, c.dim, codes + s * spv * kVqRows,
                                    c.kc, c.books, base, s * spv, chains));
        finish_segment(c, b, s, chains, acc);
      }
      store(c, b, i, acc);
    }
  }
  return top;
}

// The rows path over blocks [b0, b1): each row decodes its entries and multiplies them by x.
template <class Code>
uint32_t rows_task(const Call<Code>& c, int64_t b0, int64_t b1) {
  const auto& kern = vqmm::kernels();
  const auto& ck = kern.template of<Code>();
  const int64_t spv = c.nv / c.nseg, len = spv * c.dim;
  uint32_t top = 0;
  int64_t off[kVqRows];
  float acc[kVqRows], part[kVqRows];
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t l = 0; l < kVqRows; ++l)
      off[l] = std::min(b * kVqRows + l, c.n - 1) / c.group_rows * c.kc * c.dim;
    const Code* codes = c.packed + b * c.nv * kVqRows;
    for (int64_t i = 0; i < c.m; ++i) {
      std::fill(acc, acc + kVqRows, 0.0f);
      for (int64_t s = 0; s < c.nseg; ++s) {
        top = std::max(top, ck.rows(c.x + i * c.nv * c.dim + s * len, len, c.dim,
                                    codes + s * spv * kVqRows, c.kc, c.books, off, part));
        if (c.scales)
          add_scaled(c, b, s, part, acc);
        else
          for (int64_t l = 0; l < kVqRows; ++l) acc[l] = acc[l] + part[l];
      }
      store(c, b, i, acc);
    }
  }
  return top;
}

template <class Code>
void run(Call<Code> c) {
  if (!c.scales) c.nseg = 1;
  if (c.m <= 0 || c.n <= 0) return;
  if (c.nv <= 0) {  // K = 0: y = bias
    for (int64_t i = 0; i < c.m; ++i)
      for (int64_t r = 0; r < c.n; ++r) c.y[i * c.n + r] = c.bias ? c.bias[r] : 0.0f;
    return;
  }
  // rows path: large codebooks of 2-, 4- or 8-d vectors, segments of whole 32 columns
  const bool rows = c.kc > 32 && (c.dim == 2 || c.dim == 4 || c.dim == 8) &&
                    (c.nv / c.nseg * c.dim) % 32 == 0;
  const bool table = !rows && (c.groups == 1 || c.group_rows % kVqRows == 0);
  if constexpr (std::is_same_v<Code, vqmm::Nib4>)
    if (!table || c.kc > 16 || (c.nseg > 1 && (c.nv / c.nseg) % 8))
      throw std::invalid_argument(
          "gemm_vq: 4-bit packed codes need the table path (<= 16 entries, one codebook per "
          "layer or per a multiple of 16 rows, segments of a multiple of 8 vectors)");
  if (table) {
    c.bookt.resize(static_cast<size_t>(c.groups * c.dim * c.kc));
    for (int64_t g = 0; g < c.groups; ++g)
      for (int64_t e = 0; e < c.kc; ++e)
        for (int64_t d = 0; d < c.dim; ++d)
          c.bookt[(g * c.dim + d) * c.kc + e] = c.books[(g * c.kc + e) * c.dim + d];
  }
  const int64_t nb = (c.n + kVqRows - 1) / kVqRows;
  const int threads = pool_threads();
  // one task per thread when a codebook spans the layer (each task builds its tables once)
  const int64_t tasks = threads == 1 || c.n * c.nv * c.dim < kMinParallel
                            ? 1
                            : std::min<int64_t>(nb, table && c.groups == 1 ? threads
                                                                           : 4 * threads);
  run_blocks("gemm_vq", c.kc, nb, tasks, [&](int64_t b0, int64_t b1) -> uint32_t {
    if constexpr (std::is_same_v<Code, vqmm::Nib4>)
      return table_task(c, b0, b1);
    else
      return rows    ? rows_task(c, b0, b1)
             : table ? table_task(c, b0, b1)
                     : lane_task(c, b0, b1);
  });
}

}  // namespace

void gemm_vq(const float* x, int64_t m, const uint8_t* packed, int64_t n, int64_t nv,
             const float* books, int64_t groups, int64_t kc, int64_t dim, int64_t group_rows,
             const float* scales, int64_t nseg, const float* bias, float* y) {
  run(Call<uint8_t>{x, m, packed, n, nv, books, groups, kc, dim, group_rows, scales, nseg, bias,
                    y, {}});
}

void gemm_vq(const float* x, int64_t m, const uint16_t* packed, int64_t n, int64_t nv,
             const float* books, int64_t groups, int64_t kc, int64_t dim, int64_t group_rows,
             const float* scales, int64_t nseg, const float* bias, float* y) {
  run(Call<uint16_t>{x, m, packed, n, nv, books, groups, kc, dim, group_rows, scales, nseg, bias,
                     y, {}});
}

namespace {

// Rows of blocks [b0, b1) of the decoded weight (api.h vq_decode); the largest code read.
template <class Code>
uint32_t decode_task(const Call<Code>& c, int64_t b0, int64_t b1, float* w) {
  const int64_t k = c.nv * c.dim, spv = c.nv / c.nseg;
  uint32_t top = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const Code* codes = codes_at(c, b, 0);
    for (int64_t l = 0; l < kVqRows; ++l) {
      const int64_t r = b * kVqRows + l;
      if (r >= c.n) break;
      const float* book = c.books + r / c.group_rows * c.kc * c.dim;
      float* row = w + r * k;
      for (int64_t v = 0; v < c.nv; ++v) {
        const uint32_t code = vqmm::code_of(codes, v, l);
        top = code > top ? code : top;
        const float* e = book + (code < c.kc ? code : c.kc - 1) * c.dim;
        if (c.scales) {
          const float s = c.scales[r * c.nseg + v / spv];
          for (int64_t d = 0; d < c.dim; ++d) row[v * c.dim + d] = e[d] * s;
        } else {
          for (int64_t d = 0; d < c.dim; ++d) row[v * c.dim + d] = e[d];
        }
      }
    }
  }
  return top;
}

template <class Code>
void decode(Call<Code> c, float* w) {
  if (!c.scales) c.nseg = 1;
  if (c.n <= 0 || c.nv <= 0) return;
  const int64_t nb = (c.n + kVqRows - 1) / kVqRows;
  const int64_t tasks = pool_threads() == 1 || c.n * c.nv * c.dim < kMinParallel
                            ? 1
                            : std::min<int64_t>(nb, 4 * pool_threads());
  run_blocks("vq_decode", c.kc, nb, tasks,
             [&](int64_t b0, int64_t b1) { return decode_task(c, b0, b1, w); });
}

}  // namespace

void vq_decode(const void* packed, int layout, int64_t n, int64_t nv, const float* books,
               int64_t groups, int64_t kc, int64_t dim, int64_t group_rows, const float* scales,
               int64_t nseg, float* w) {
  if (layout == 2)
    decode(Call<vqmm::Nib4>{nullptr, 0, static_cast<const vqmm::Nib4*>(packed), n, nv, books,
                            groups, kc, dim, group_rows, scales, nseg, nullptr, nullptr, {}},
           w);
  else if (layout == 1)
    decode(Call<uint16_t>{nullptr, 0, static_cast<const uint16_t*>(packed), n, nv, books,
                          groups, kc, dim, group_rows, scales, nseg, nullptr, nullptr, {}},
           w);
  else
    decode(Call<uint8_t>{nullptr, 0, static_cast<const uint8_t*>(packed), n, nv, books, groups,
                         kc, dim, group_rows, scales, nseg, nullptr, nullptr, {}},
           w);
}

void gemm_vq_p4(const float* x, int64_t m, const uint32_t* words, int64_t n, int64_t nv,
                const float* books, int64_t groups, int64_t kc, int64_t dim, int64_t group_rows,
                const float* scales, int64_t nseg, const float* bias, float* y) {
  run(Call<vqmm::Nib4>{x, m, reinterpret_cast<const vqmm::Nib4*>(words), n, nv, books, groups,
                       kc, dim, group_rows, scales, nseg, bias, y, {}});
}

}  // namespace qk
