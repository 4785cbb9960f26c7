// AVX2 gemm_vq8 (api.h) for a few rows of x and codebooks past 16 entries, where decoding the
// codes costs more than the products (scalar look-ups, avx2.cpp): per call, every activation
// vector's int32 dot product with every codebook entry,
//   dots[((g m + i) nv + v) 256 + c] = sum_d tables[g][d][c] xq[i][v dim + d],
// then each code is one 32-bit gather (index = the code byte; entries past kc are 0 in the
// tables, so in dots, and the caller raises on the largest code), summed per block of 32
// columns: api.h's D exactly (|D| <= 32 127^2), so the same bits as every other path. At
// dim 2 a dot fits int16 (|dot| <= 2 127^2 < 2^15): the table is int16, half the bytes, and
// each gather reads 4 bytes at the entry and keeps the low 16 bits, sign-extended.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "cpu/gemm/tile/driver.h"
#include "cpu/gemm/vq8/kernels.h"
#include "cpu/runtime/aligned.h"
#include "cpu/runtime/threadpool.h"

namespace qk {
namespace vq8 {
namespace {

constexpr int64_t kMaxRows = 3;                  // m below avx2.cpp's panel (4 rows)
constexpr int64_t kMaxDotBytes = int64_t{16} << 20;  // the dots table's cap (16 MiB)
constexpr int64_t kChunkDotBytes = int64_t{128} << 10;  // dots read per pass over the blocks

// Bytes per dot: int16 at dim 2, int32 above.
int64_t dot_bytes(const Problem& p) { return p.dim == 2 ? 2 : 4; }

// Bytes of one x row's dots (every codebook group's).
int64_t row_dot_bytes(const Problem& p) { return p.groups * p.nv * 256 * dot_bytes(p); }

// The tables' planes in pairs for vpmaddwd: pairs[(g dim / 2 + d / 2) 256 + c] = the int16s
// (tables[g][d][c], tables[g][d + 1][c]), low half first.
AlignedVector<uint32_t> table_pairs(const Problem& p) {
  AlignedVector<uint32_t> pairs(static_cast<size_t>(p.groups * p.dim / 2 * 256));
  for (int64_t g = 0; g < p.groups; ++g)
    for (int64_t d = 0; d < p.dim; d += 2)
      for (int64_t c = 0; c < 256; ++c) {
        const int8_t* plane = p.tables + (g * p.dim + d) * 256 + c;
        pairs[(g * p.dim / 2 + d / 2) * 256 + c] =
            static_cast<uint16_t>(int16_t{plane[0]}) |
            static_cast<uint32_t>(static_cast<uint16_t>(int16_t{plane[256]})) << 16;
      }
  return pairs;
}

// dots (E: int32_t, or int16_t at dim 2) for codebook group g, x row i, vectors [v0, v1): 8
// entries at a time, the dims in pairs through vpmaddwd (a pair's sum <= 2 127^2, the dim-8
// total <= 8 127^2: no overflow); int16: two such vectors packed (exact: they fit).
template <typename E>
void build_dots(const Problem& p, const uint32_t* pairs, int64_t g, int64_t i, int64_t v0,
                int64_t v1, E* dots) {
  const int64_t nq = p.nv / kVq8Group, np = p.dim / 2;
  const auto* pg = reinterpret_cast<const __m256i*>(pairs + g * np * 256);
  for (int64_t v = v0; v < v1; ++v) {
    const int64_t sh = 8 * (v % kVq8Group);
    const uint32_t* w = p.xp + (i * nq + v / kVq8Group) * p.dim;
    __m256i xpair[4];  // (x[d], x[d + 1]) as the int16s of each 32-bit lane
    for (int64_t j = 0; j < np; ++j) {
      const auto lo = static_cast<uint16_t>(int16_t{static_cast<int8_t>(w[2 * j] >> sh)});
      const auto hi = static_cast<uint16_t>(int16_t{static_cast<int8_t>(w[2 * j + 1] >> sh)});
      xpair[j] = _mm256_set1_epi32(static_cast<int>(lo | static_cast<uint32_t>(hi) << 16));
    }
    auto* out = reinterpret_cast<__m256i*>(dots + ((g * p.m + i) * p.nv + v) * 256);
    auto dot8 = [&](int64_t c) {  // entries 8 c .. 8 c + 7
      __m256i acc = _mm256_madd_epi16(_mm256_load_si256(pg + c), xpair[0]);
      for (int64_t j = 1; j < np; ++j) {
        const __m256i t = _mm256_load_si256(pg + j * 32 + c);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(t, xpair[j]));
      }
      return acc;
    };
    if constexpr (sizeof(E) == 2) {
      for (int64_t c = 0; c < 16; ++c)  // packs works per 128-bit lane: 0xD8 restores order
        _mm256_store_si256(out + c, _mm256_permute4x64_epi64(
                                        _mm256_packs_epi32(dot8(2 * c), dot8(2 * c + 1)), 0xD8));
    } else {
      for (int64_t c = 0; c < 32; ++c) _mm256_store_si256(out + c, dot8(c));
    }
  }
}

// One gathered dot per lane: 4 bytes at src + idx entries; int16 entries sign-extended.
template <typename E>
inline __m256i gather_dots(const E* src, __m256i idx) {
  const __m256i v = _mm256_i32gather_epi32(reinterpret_cast<const int*>(src), idx, sizeof(E));
  if constexpr (sizeof(E) == 2) return _mm256_srai_epi32(_mm256_slli_epi32(v, 16), 16);
  return v;
}

// Blocks of 32 columns [blk0, blk1) of 16-row block b for all MR = m rows of x: y[i * 16 + l]
// holds the sums over the blocks before blk0 (0 when blk0 = 0) and gets those to blk1; at
// blk1 = nblk it is out as BlockFn (kernels.h) leaves it. Returns the largest code read.
template <int MR, typename E>
uint32_t block_dots(const Problem& p, int64_t b, const E* dots, int64_t blk0, int64_t blk1,
                    float* out) {
  const int64_t qpb = 8 / p.dim;  // code groups per block of 32 columns
  const int64_t g = p.groups == 1 ? 0 : b * kVq8Rows / p.group_rows;
  const uint8_t* codes = p.packed4 + b * block_bytes(p);
  const __m256i m255 = _mm256_set1_epi32(255);
  const E* base[MR];
  __m256 y[MR][2];
  for (int i = 0; i < MR; ++i) {
    base[i] = dots + (g * p.m + i) * p.nv * 256;
    y[i][0] = blk0 ? _mm256_loadu_ps(out + i * kVq8Rows) : _mm256_setzero_ps();
    y[i][1] = blk0 ? _mm256_loadu_ps(out + i * kVq8Rows + 8) : _mm256_setzero_ps();
  }
  __m256i top = _mm256_setzero_si256();
  alignas(32) float s[kVq8Rows];
  int64_t seg = -1;
  for (int64_t blk = blk0, q = blk0 * qpb; blk < blk1; ++blk) {
    __m256i a[MR][2];
    for (int i = 0; i < MR; ++i) a[i][0] = a[i][1] = _mm256_setzero_si256();
    for (int64_t e = 0; e < qpb; ++e, ++q) {
      // rows 0-7 and 8-15 of code group q: lane l = row l's codes of vectors 4 q .. 4 q + 3
      const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + q * 64));
      const __m256i c1 =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + q * 64 + 32));
      top = _mm256_max_epu8(top, _mm256_max_epu8(c0, c1));
      for (int t = 0; t < 4; ++t) {
        const __m256i i0 = _mm256_and_si256(_mm256_srli_epi32(c0, 8 * t), m255);
        const __m256i i1 = _mm256_and_si256(_mm256_srli_epi32(c1, 8 * t), m255);
        const int64_t off = (4 * q + t) * 256;
        for (int i = 0; i < MR; ++i) {
          a[i][0] = _mm256_add_epi32(a[i][0], gather_dots(base[i] + off, i0));
          a[i][1] = _mm256_add_epi32(a[i][1], gather_dots(base[i] + off, i1));
        }
      }
    }
    if (blk * p.nseg / p.nblk != seg) {
      seg = blk * p.nseg / p.nblk;
      for (int64_t l = 0; l < kVq8Rows; ++l) s[l] = row_scale(p, b * kVq8Rows + l, blk);
    }
    for (int i = 0; i < MR; ++i) {
      const __m256 dx = _mm256_set1_ps(p.dx[i * p.nblk + blk]);
      for (int h = 0; h < 2; ++h) {
        const __m256 t = _mm256_mul_ps(dx, _mm256_load_ps(s + 8 * h));
        y[i][h] = _mm256_add_ps(y[i][h], _mm256_mul_ps(_mm256_cvtepi32_ps(a[i][h]), t));
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(out + i * kVq8Rows, y[i][0]);
    _mm256_storeu_ps(out + i * kVq8Rows + 8, y[i][1]);
  }
  alignas(32) uint8_t tb[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(tb), top);
  return *std::max_element(tb, tb + 32);
}

template <typename E>
uint32_t run_dots(const Problem& p, bool parallel, const BlockStore& store) {
  // x rows in batches whose dots fit kMaxDotBytes (all m rows at once but for the widest
  // layers); the blocks' outputs go to `store` at once, or once every batch is done
  const int64_t rows = std::min(p.m, kMaxDotBytes / row_dot_bytes(p));
  const int64_t nb = (p.n + kVq8Rows - 1) / kVq8Rows;
  thread_local AlignedVector<int32_t> own;  // the caller's, reused: no page faults per call
  own.resize(static_cast<size_t>(row_dot_bytes(p) / 4 * rows + 8));  // + the last gather's
  E* dots = reinterpret_cast<E*>(own.data());  // (the pool's threads see their own thread_local)
  AlignedVector<float> outs(static_cast<size_t>(rows < p.m ? nb * p.m * kVq8Rows : 0));
  const AlignedVector<uint32_t> pair_words = table_pairs(p);
  const uint32_t* pairs = pair_words.data();
  // few tasks, so that each reads a chunk's dots for many blocks
  const int64_t tasks = parallel ? std::min<int64_t>(nb, 2 * pool_threads()) : 1;
  std::vector<uint32_t> tops(static_cast<size_t>(tasks), 0);
  for (int64_t i0 = 0; i0 < p.m; i0 += rows) {
    Problem q = p;  // x rows [i0, i0 + q.m)
    q.m = std::min(rows, p.m - i0);
    q.xp += i0 * (p.nv / kVq8Group) * p.dim;
    q.dx += i0 * p.nblk;
    q.xs += i0 * p.nblk;
    const int64_t slices = q.groups * q.m;  // (g, i) pairs, each nv vectors
    tdrv::run_tasks(tasks, parallel, [&](int64_t ti) {
      for (int64_t gi = 0; gi < slices; ++gi)
        build_dots<E>(q, pairs, gi / q.m, gi % q.m, q.nv * ti / tasks, q.nv * (ti + 1) / tasks,
                   dots);
    });
    // the task's blocks a chunk of columns at a time, so that the chunk's dots stay in the
    // cache while every block reads them (a whole row's are 1 MiB at K = 4096, dim 4)
    const int64_t per_block = q.m * 32 / q.dim * 256 * dot_bytes(q);  // of 32 columns
    const int64_t chunk = std::max<int64_t>(1, kChunkDotBytes / per_block);
    tdrv::run_tasks(tasks, parallel, [&](int64_t ti) {
      const int64_t b0 = nb * ti / tasks, b1 = nb * (ti + 1) / tasks;
      AlignedVector<float> ys(static_cast<size_t>((b1 - b0) * q.m * kVq8Rows));
      for (int64_t c0 = 0; c0 < q.nblk; c0 += chunk)
        for (int64_t b = b0; b < b1; ++b) {
          float* y = ys.data() + (b - b0) * q.m * kVq8Rows;
          const int64_t c1 = std::min(q.nblk, c0 + chunk);
          uint32_t t = 0;
          if (q.m == 1) t = block_dots<1, E>(q, b, dots, c0, c1, y);
          else if (q.m == 2) t = block_dots<2, E>(q, b, dots, c0, c1, y);
          else t = block_dots<3, E>(q, b, dots, c0, c1, y);
          tops[ti] = std::max(tops[ti], t);
        }
      for (int64_t b = b0; b < b1; ++b) {
        const float* y = ys.data() + (b - b0) * q.m * kVq8Rows;
        if (outs.empty()) store(b, y);
        else std::copy(y, y + q.m * kVq8Rows, outs.data() + (b * p.m + i0) * kVq8Rows);
      }
    });
  }
  if (!outs.empty())
    tdrv::run_tasks(tasks, parallel, [&](int64_t ti) {
      for (int64_t b = nb * ti / tasks; b < nb * (ti + 1) / tasks; ++b)
        store(b, outs.data() + b * p.m * kVq8Rows);
    });
  return *std::max_element(tops.begin(), tops.end());
}

}  // namespace

bool dots_fit(const Problem& p) {
  return p.m <= kMaxRows && p.kc > 16 && !p.nib && row_dot_bytes(p) <= kMaxDotBytes;
}

uint32_t call_dots(const Problem& p, bool parallel, const BlockStore& store) {
  return p.dim == 2 ? run_dots<int16_t>(p, parallel, store) : run_dots<int32_t>(p, parallel, store);
}

}  // namespace vq8
}  // namespace qk
