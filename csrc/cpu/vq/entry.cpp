// VQ entry points (api.h): norms and centroid panels once per call, ISA dispatch, and rows
// spread over the thread pool in fixed blocks (each row's result is computed by one kernel call
// whatever the thread count, so results do not depend on it).
#include <algorithm>
#include <vector>

#include "cpu/runtime/threadpool.h"
#include "cpu/vq/kernels.h"

namespace qk {
namespace {

// Rows per task: about this many multiply-adds, so that waking the pool pays.
constexpr int64_t kTaskWork = int64_t{1} << 18;

float sqnorm(const float* v, int64_t d) {
  float s = 0.0f;
  for (int64_t t = 0; t < d; ++t) s = s + v[t] * v[t];
  return s;
}

// fn(r0, r1) over [0, rows) in blocks of `per` rows (a multiple of 12, the SIMD row blocks).
template <class Fn>
void over_rows(int64_t rows, int64_t work_per_row, const Fn& fn) {
  int64_t per = kTaskWork / std::max<int64_t>(work_per_row, 1);
  per = std::max<int64_t>(12, per / 12 * 12);
  const int64_t tasks = (rows + per - 1) / per;
  auto task = [&](int64_t t) { fn(t * per, std::min(rows, (t + 1) * per)); };
  if (tasks <= 1 || pool_threads() == 1) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
    return;
  }
  parallel_for(tasks, task);
}

// The centroid panels and norms of vq::Packed (kernels.h), owned.
struct PackedOwner {
  std::vector<float> pan, norms;
  vq::Packed packed;
  // ldx: the row stride of the x it will be matched against (d, or more for a sub-vector).
  PackedOwner(const float* cent, int64_t k, int64_t d, int64_t ldx) {
    const int64_t panels = (k + vq::kPanel - 1) / vq::kPanel;
    pan.assign(static_cast<size_t>(panels * d * vq::kPanel), 0.0f);
    norms.assign(static_cast<size_t>(panels * vq::kPanel), __builtin_inff());
    for (int64_t j = 0; j < k; ++j) {
      const float* c = cent + j * d;
      norms[j] = sqnorm(c, d);
      float* p = pan.data() + (j / vq::kPanel) * d * vq::kPanel + j % vq::kPanel;
      for (int64_t t = 0; t < d; ++t) p[t * vq::kPanel] = c[t];
    }
    packed = vq::Packed{pan.data(), norms.data(), cent, k, d, ldx};
  }
};

template <class Code>
void assign_impl(const float* x, int64_t n, int64_t d, const float* cent, int64_t k, Code* codes,
                 float* dist) {
  if (n <= 0 || k <= 0 || d <= 0) return;
  const PackedOwner own(cent, k, d, d);
  const vq::Packed& packed = own.packed;
  const auto& kern = vq::kernels();
  over_rows(n, k * d, [&](int64_t r0, int64_t r1) {
    int64_t idx[96];
    for (int64_t i = r0; i < r1; i += 96) {
      const int64_t len = std::min<int64_t>(96, r1 - i);
      kern.assign(x + i * d, len, packed, idx, dist + i);
      for (int64_t r = 0; r < len; ++r) {
        codes[i + r] = static_cast<Code>(idx[r]);
        dist[i + r] = std::max(0.0f, sqnorm(x + (i + r) * d, d) + dist[i + r]);
      }
    }
  });
}

void topk_impl(const float* x, int64_t n, int64_t d, const float* cent, int64_t k, int64_t kk,
               int64_t* idx, float* dist) {
  if (n <= 0 || k <= 0 || d <= 0 || kk <= 0) return;
  const PackedOwner own(cent, k, d, d);
  const auto& kern = vq::kernels();
  over_rows(n, k * d, [&](int64_t r0, int64_t r1) {
    kern.topk(x + r0 * d, r1 - r0, own.packed, kk, idx + r0 * kk, dist + r0 * kk);
    for (int64_t i = r0; i < r1; ++i) {
      const float xn = sqnorm(x + i * d, d);
      for (int64_t e = i * kk; e < (i + 1) * kk; ++e) dist[e] = std::max(0.0f, xn + dist[e]);
    }
  });
}

template <class Code>
void scan_impl(const float* table, int64_t nq, int64_t ksub, const Code* codes, int64_t n,
               int64_t m, float* dist) {
  if (nq <= 0 || n <= 0) return;
  const auto& kern = vq::kernels();
  // Tasks: blocks of codes; each block is scanned in slices of ~16 KiB of codes that stay in
  // cache while every query's table runs over them (the codes are read from memory once).
  const int64_t slice = std::max<int64_t>(16, (int64_t{16} << 10) / (m * sizeof(Code)));
  const int64_t per = std::max<int64_t>(slice, kTaskWork / std::max<int64_t>(m * nq, 1)) /
                      slice * slice;
  const int64_t blocks = (n + per - 1) / per;
  auto task = [&](int64_t t) {
    const int64_t end = std::min(n, (t + 1) * per);
    for (int64_t i0 = t * per; i0 < end; i0 += slice) {
      const int64_t len = std::min(slice, end - i0);
      if constexpr (sizeof(Code) == 1)
        kern.scan_u8(table, nq, ksub, codes + i0 * m, len, m, dist + i0, n);
      else
        kern.scan_u16(table, nq, ksub, codes + i0 * m, len, m, dist + i0, n);
    }
  };
  if (blocks == 1 || pool_threads() == 1) {
    for (int64_t t = 0; t < blocks; ++t) task(t);
    return;
  }
  parallel_for(blocks, task);
}

// The beam searches of a block of rows (api.h rq_beam_encode), advanced stage by stage: every
// row of the block goes through stage s before any goes on to s + 1, so the block's rows share
// stage s's slice of the cross table (s K rows of K floats, up to 8 MiB at 32 x 256) from the
// cache, where one row at a time through all m stages read the whole table (124 MiB at
// 32 x 256) from memory for every row. A row's beam entries mostly share the first codes of
// their partial codes, so their cross-term sums are prefix sums along a trie: taken in
// lexicographic order of their codes (kept as each entry's rank: a child's rank is its
// parent's, then its codeword; the common prefix of neighbours follows from the parents'),
// each entry extends the previous one's running sums from their common prefix on (the same
// float32 additions in the same order as summing each entry's s rows alone: bit-identical;
// digits, 32 x 256, beam 16: 6 x fewer rows); the trie's trunk, the codes all of a row's
// entries share, is summed for the whole block level by level first (trunks). The candidates
// are then offered best parent first (the previous stage's order), into a list that starts at
// a bound from the best parent's offers (Kernels::beam_bound), so that fewer candidates are
// inserted (AVX-512: a list of <= 16 held in registers, avx512.cpp beam_offer_reg). Codes held
// as int32 (K <= 2^16); the next row's are prefetched (a block's codes, 2 MiB at
// 1024 x 16 x 32, sit in L3 beside the cross table's slice). Digits 32 x 256, beam 16, 1
// thread: 0.28 -> 0.23 s from the register list, the branch-free ranks and the prefetch;
// beam 12: 0.178 -> 0.159 s from the trunks and the bound.
struct BeamBlock {
  int64_t m, k, beam, chunk, nb = 1;  // chunk: rows per trunks() call
  std::vector<float> dist, ndist, t, sums, own, trunk;
  std::vector<int32_t> code, ncode, rank, nrank, lcp, nlcp;  // lcp[i]: codes the entries at
  std::vector<int64_t> sel, order, par, cw, key;               // positions i - 1, i share
  std::vector<int32_t> depth;  // depth[r]: the length of row r's trunk
  BeamBlock(int64_t m_, int64_t k_, int64_t beam_, int64_t len)
      : m(m_), k(k_), beam(beam_), chunk(std::max<int64_t>(1, std::min(len, (1 << 18) / k_))),
        dist(len * beam_), ndist(len * beam_), t(k_), sums((m_ + 1) * k_, 0.0f),
        own(beam_ * k_), trunk(chunk * k_), code(len * beam_ * m_),
        ncode(len * beam_ * m_), rank(len * beam_, 0), nrank(len * beam_),
        lcp(len * beam_, 0), nlcp(len * beam_, 0), sel(beam_), order(beam_), par(beam_),
        cw(beam_), key(beam_), depth(len, 0) {}
  void start(const float* xn, int64_t len) {
    nb = 1;
    for (int64_t r = 0; r < len; ++r) {
      dist[r * beam] = xn[r];
      rank[r * beam] = 0;
    }
  }
  // Stage s of rows [0, len): xc (len, K) their dot products with stage s's codewords, norms
  // those codewords' squared norms.
  // Each row's trunk, the codes all its entries share (up to s - 1 of them): their sums
  // into trunk[r - r0], level by level over rows [r0, r1) (a chunk of the block whose sums
  // take at most 1 MiB: the whole block at K <= 256), so that a level's rows of the table
  // (K rows of K floats, 256 KiB at K = 256) serve every row of the chunk from the L2 cache
  // (the same additions in the same order as the walk down the trie: bit-identical).
  void trunks(int64_t s, int64_t r0, int64_t r1, const float* cs, const vq::Kernels& kern) {
    int64_t most = 0;
    for (int64_t r = r0; r < r1; ++r) {
      int32_t t_r = static_cast<int32_t>(s - 1);
      for (int64_t i = 1; i < nb; ++i) t_r = std::min(t_r, lcp[r * beam + i]);
      depth[r] = t_r;
      most = std::max<int64_t>(most, t_r);
    }
    std::fill(trunk.begin(), trunk.begin() + (r1 - r0) * k, 0.0f);
    for (int64_t j = 0; j < most; ++j) {
      for (int64_t r = r0; r < r1; ++r) {
        if (depth[r] <= j) continue;
        const int32_t c = code[r * beam * m + j];  // entry 0's (every entry's) code j
        float* acc = trunk.data() + (r - r0) * k;
        kern.row_add(acc, cs + (j * k + c) * k, k, acc);
      }
    }
  }
  void stage(int64_t s, int64_t len, const float* xc, const float* norms, const float* cross,
             const vq::Kernels& kern) {
    const float* cs = cross + k * k * s * (s - 1) / 2;  // (s K, K); unused at s = 0
    const int64_t keep = std::min(beam, nb * k);
    for (int64_t r = 0; r < len; ++r) {
      if (s > 0 && r % chunk == 0) trunks(s, r, std::min(len, r + chunk), cs, kern);
      for (int64_t c = 0; c < k; ++c) t[c] = norms[c] - 2.0f * xc[r * k + c];
      float* nd = ndist.data() + r * beam;
      const int32_t* rc = code.data() + r * beam * m;  // entry b's codes at rc + b * m
      const int32_t* rr = rank.data() + r * beam;
      const int32_t* rl = lcp.data() + r * beam;
      if (r + 1 < len) {  // the next row's codes (beam m int32: 2 KiB at 16 x 32) are read
        const char* nc = reinterpret_cast<const char*>(rc + beam * m);  // scattered: from L3
        for (int64_t o = 0; o < nb * m * 4; o += 64) __builtin_prefetch(nc + o);
      }
      for (int64_t b = 0; b < nb; ++b) order[rr[b]] = b;  // lexicographic order
      for (int64_t i = 0; i < nb; ++i) {  // each entry's sums into own[b]: sums[j] hold the
        const int64_t b = order[i];       // sums of the first j rows of the previous entry
        const int32_t* pb = rc + b * m;
        if (s == 0) std::fill(own.begin() + b * k, own.begin() + (b + 1) * k, 0.0f);
        for (int64_t j = i == 0 ? depth[r] : rl[i]; j < s; ++j) {
          float* to = j + 1 == s ? own.data() + b * k : sums.data() + (j + 1) * k;
          const float* from =
              j == depth[r] ? trunk.data() + (r % chunk) * k : sums.data() + j * k;
          kern.row_add(from, cs + (j * k + pb[j]) * k, k, to);
        }
      }
      vq::topk_init(nd, sel.data(), keep, nb * k);
      // the list starts at a bound from the best parent's offers (fewer insertions, the same
      // list: keep candidates lie at or below it; the placeholders' index nb K sorts last)
      const float lim = kern.beam_bound(own.data(), k, t.data(), dist[r * beam], keep);
      if (lim < __builtin_inff()) std::fill(nd, nd + keep, lim);
      for (int64_t b = 0; b < nb; ++b) {  // best parent first
        kern.beam_offer(own.data() + b * k, k, t.data(), dist[r * beam + b], b * k, nd,
                        sel.data(), keep);
      }
      int32_t* nrr = nrank.data() + r * beam;
      for (int64_t e = 0; e < keep; ++e) {
        par[e] = sel[e] / k;
        cw[e] = sel[e] % k;
        const int32_t* pb = rc + par[e] * m;
        int32_t* pe = ncode.data() + (r * beam + e) * m;
        std::copy(pb, pb + s, pe);
        pe[s] = static_cast<int32_t>(cw[e]);
      }
      for (int64_t e = 0; e < keep; ++e) key[e] = rr[par[e]] * k + cw[e];
      for (int64_t e = 0; e < keep; ++e) {  // rank: (parent's rank, codeword) order, counted
        int32_t below = 0;                  // without branches (distinct keys)
        for (int64_t f = 0; f < keep; ++f) below += key[f] < key[e];
        nrr[e] = below;
        order[below] = e;
      }
      // Neighbours' common prefixes: s codes under one parent, else the least common prefix
      // of the parents' neighbours between them (sorted strings).
      int32_t* nl = nlcp.data() + r * beam;
      for (int64_t i = 1; i < keep; ++i) {
        const int64_t a = par[order[i - 1]], b = par[order[i]];
        int32_t v = static_cast<int32_t>(s);
        for (int32_t q = rr[a] + 1; q <= rr[b]; ++q) v = std::min(v, rl[q]);
        nl[i] = v;
      }
    }
    code.swap(ncode);
    dist.swap(ndist);
    rank.swap(nrank);
    lcp.swap(nlcp);
    nb = keep;
  }
};

// One vector's local search (api.h icm_encode / ils_encode) on the look-up tables: u the
// unary terms (m K), the pair rows from the cross table and its transposed blocks.
struct LocalSearch {
  int64_t m, k, d;
  const float *books, *cross, *cross_t;
  const vq::Kernels& kern;
  std::vector<float> u;
  std::vector<const float*> rows;
  std::vector<int64_t> start, best, cand;
  std::vector<double> recon;
  LocalSearch(int64_t m_, int64_t k_, int64_t d_, const float* books_, const float* cross_,
              const float* cross_t_, const vq::Kernels& kern_)
      : m(m_), k(k_), d(d_), books(books_), cross(cross_), cross_t(cross_t_), kern(kern_),
        u(m_ * k_), rows(m_), start(m_), best(m_), cand(m_), recon(d_) {}
  // <books[i][a], books[j][c]> for c < K (i != j): a row of the cross table (i < j) or of its
  // transposed block (i > j).
  const float* pair_row(int64_t j, int64_t i, int64_t a) const {
    return i < j ? cross + k * k * j * (j - 1) / 2 + (i * k + a) * k
                 : cross_t + k * k * i * (i - 1) / 2 + (j * k + a) * k;
  }
  // Up to iters sweeps on b (j = 0..m-1 in turn); stops after a sweep that changed nothing.
  void sweeps(int64_t* b, int64_t iters) {
    for (int64_t it = 0; it < iters; ++it) {
      bool moved = false;
      for (int64_t j = 0; j < m; ++j) {
        int64_t nr = 0;
        for (int64_t i = 0; i < m; ++i)
          if (i != j) rows[nr++] = pair_row(j, i, b[i]);
        const int64_t c = kern.lut_argmin(u.data() + j * k, rows.data(), nr, k);
        if (c != b[j]) {
          b[j] = c;
          moved = true;
        }
      }
      if (!moved) break;
    }
  }
  // ||x - sum_j books[j][b_j]||^2 in float64: the sum in codebook order, then over t in order.
  double err(const float* x, const int64_t* b) {
    std::fill(recon.begin(), recon.end(), 0.0);
    for (int64_t j = 0; j < m; ++j) {
      const float* c = books + (j * k + b[j]) * d;
      for (int64_t t = 0; t < d; ++t) recon[t] += static_cast<double>(c[t]);
    }
    double e = 0.0;
    for (int64_t t = 0; t < d; ++t) {
      const double r = static_cast<double>(x[t]) - recon[t];
      e += r * r;
    }
    return e;
  }
  // rounds < 0: plain ICM; else ILS, the perturbations (rounds, n, nperts) book / code pairs,
  // row i's of round r at (r * n + i) * nperts.
  void row(const float* x, const float* xc, const float* norms, int64_t icm_iters,
           int64_t rounds, int64_t n, int64_t i, int64_t nperts, const int32_t* pbook,
           const int32_t* pcode, int64_t* codes) {
    for (int64_t c = 0; c < m * k; ++c) u[c] = norms[c] - 2.0f * xc[c];
    if (rounds < 0) {
      sweeps(codes, icm_iters);
      return;
    }
    std::copy(codes, codes + m, start.data());
    std::copy(codes, codes + m, best.data());
    sweeps(best.data(), icm_iters);
    double e_best = err(x, best.data());
    const double e_start = err(x, start.data());
    if (e_best > e_start) {
      best = start;
      e_best = e_start;
    }
    for (int64_t r = 0; r < rounds; ++r) {
      cand = best;
      const int64_t o = (r * n + i) * nperts;
      for (int64_t p = 0; p < nperts; ++p) cand[pbook[o + p]] = pcode[o + p];
      sweeps(cand.data(), icm_iters);
      const double e = err(x, cand.data());
      if (e < e_best) {
        best.swap(cand);
        e_best = e;
      }
    }
    std::copy(best.begin(), best.end(), codes);
  }
};

void local_search(const float* x, int64_t n, int64_t d, const float* books, int64_t m, int64_t k,
                  const float* cross, int64_t icm_iters, int64_t rounds, int64_t nperts,
                  const int32_t* pbook, const int32_t* pcode, int64_t* codes) {
  if (n <= 0 || m <= 0 || k <= 0 || d <= 0) return;
  const int64_t mk = m * k;
  // The transposed K x K blocks of the cross table (block (s, j) at the same offset).
  std::vector<float> cross_t(static_cast<size_t>(k * k * m * (m - 1) / 2));
  for (int64_t s = 1; s < m; ++s)
    for (int64_t j = 0; j < s; ++j) {
      const int64_t off = k * k * s * (s - 1) / 2 + j * k * k;
      for (int64_t a0 = 0; a0 < k; a0 += 32)
        for (int64_t c = 0; c < k; ++c)
          for (int64_t a = a0; a < std::min(k, a0 + 32); ++a)
            cross_t[off + a * k + c] = cross[off + c * k + a];
    }
  const PackedOwner own(books, mk, d, d);  // every codeword: norms, panels
  const auto& kern = vq::kernels();
  const int64_t work = mk * d + (std::max<int64_t>(rounds, 0) + 1) * icm_iters * m * mk;
  over_rows(n, work, [&](int64_t r0, int64_t r1) {
    constexpr int64_t kChunk = 24;  // rows whose dot products are computed together
    std::vector<float> xc(static_cast<size_t>(kChunk * mk));
    LocalSearch ls(m, k, d, books, cross, cross_t.data(), kern);
    for (int64_t i0 = r0; i0 < r1; i0 += kChunk) {
      const int64_t len = std::min(kChunk, r1 - i0);
      kern.dots(x + i0 * d, len, own.packed, xc.data(), mk);
      for (int64_t r = 0; r < len; ++r)
        ls.row(x + (i0 + r) * d, xc.data() + r * mk, own.norms.data(), icm_iters, rounds, n,
               i0 + r, nperts, pbook, pcode, codes + (i0 + r) * m);
    }
  });
}

}  // namespace

void rq_cross_table(const float* books, int64_t m, int64_t k, int64_t d, float* cross) {
  if (m <= 1 || k <= 0 || d <= 0) return;
  const auto& kern = vq::kernels();
  for (int64_t s = 1; s < m; ++s) {
    const PackedOwner own(books + s * k * d, k, d, d);
    float* out = cross + k * k * s * (s - 1) / 2;
    over_rows(s * k, k * d, [&](int64_t r0, int64_t r1) {
      kern.dots(books + r0 * d, r1 - r0, own.packed, out + r0 * k, k);
    });
  }
}

void rq_beam_encode(const float* x, int64_t n, int64_t d, const float* books, int64_t m,
                    int64_t k, const float* cross, int64_t beam, int64_t* codes) {
  if (n <= 0 || m <= 0 || k <= 0 || d <= 0 || beam <= 0) return;
  std::vector<PackedOwner> own;  // each stage's codewords: norms, panels
  own.reserve(static_cast<size_t>(m));
  for (int64_t s = 0; s < m; ++s) own.emplace_back(books + s * k * d, k, d, d);
  const auto& kern = vq::kernels();
  // Blocks as large as the threads allow (BeamBlock: the larger, the fewer table reads), at
  // most kBlock rows (the block's codes and distances, beam (m + 2) words a row).
  constexpr int64_t kBlock = 1024;
  const int64_t threads = std::max<int64_t>(1, pool_threads());
  const int64_t per = std::min(kBlock, std::max<int64_t>(1, (n + threads - 1) / threads));
  const int64_t blocks = (n + per - 1) / per;
  auto task = [&](int64_t blk) {
    const int64_t i0 = blk * per, len = std::min(per, n - i0);
    std::vector<float> xc(static_cast<size_t>(len * k)), xn(static_cast<size_t>(len));
    for (int64_t r = 0; r < len; ++r) xn[r] = sqnorm(x + (i0 + r) * d, d);
    BeamBlock bb(m, k, beam, len);
    bb.start(xn.data(), len);
    for (int64_t s = 0; s < m; ++s) {
      kern.dots(x + i0 * d, len, own[s].packed, xc.data(), k);
      bb.stage(s, len, xc.data(), own[s].norms.data(), cross, kern);
    }
    for (int64_t r = 0; r < len; ++r)
      std::copy(bb.code.data() + r * beam * m, bb.code.data() + r * beam * m + m,
                codes + (i0 + r) * m);
  };
  if (blocks <= 1 || threads == 1) {
    for (int64_t b = 0; b < blocks; ++b) task(b);
    return;
  }
  parallel_for(blocks, task);
}

void icm_encode(const float* x, int64_t n, int64_t d, const float* books, int64_t m, int64_t k,
                const float* cross, int64_t icm_iters, int64_t* codes) {
  local_search(x, n, d, books, m, k, cross, icm_iters, -1, 0, nullptr, nullptr, codes);
}

void ils_encode(const float* x, int64_t n, int64_t d, const float* books, int64_t m, int64_t k,
                const float* cross, int64_t icm_iters, int64_t ils_iters, int64_t nperts,
                const int32_t* pert_book, const int32_t* pert_code, int64_t* codes) {
  local_search(x, n, d, books, m, k, cross, icm_iters, ils_iters, nperts, pert_book, pert_code,
               codes);
}

void vq_assign(const float* x, int64_t n, int64_t d, const float* centroids, int64_t k,
               int64_t* codes, float* dist) {
  assign_impl(x, n, d, centroids, k, codes, dist);
}

void vq_assign(const float* x, int64_t n, int64_t d, const float* centroids, int64_t k,
               int32_t* codes, float* dist) {
  assign_impl(x, n, d, centroids, k, codes, dist);
}

void vq_topk(const float* x, int64_t n, int64_t d, const float* centroids, int64_t k, int64_t kk,
             int64_t* idx, float* dist) {
  topk_impl(x, n, d, centroids, k, std::min(kk, k), idx, dist);
}

void vq_topk_rows(const float* values, int64_t n, int64_t len, int64_t kk, int64_t* idx) {
  if (n <= 0 || len <= 0 || kk <= 0) return;
  kk = std::min(kk, len);
  over_rows(n, len, [&](int64_t r0, int64_t r1) {
    std::vector<float> v(static_cast<size_t>(kk));
    for (int64_t i = r0; i < r1; ++i) {
      const float* row = values + i * len;
      int64_t* ri = idx + i * kk;
      vq::topk_init(v.data(), ri, kk, len);
      for (int64_t j = 0; j < len; ++j)
        if (row[j] <= v[kk - 1]) vq::topk_offer(v.data(), ri, kk, row[j], j);
    }
  });
}

void pq_encode(const float* x, int64_t n, int64_t m, int64_t ksub, int64_t dsub,
               const float* codebooks, int64_t* codes) {
  if (n <= 0 || m <= 0 || ksub <= 0 || dsub <= 0) return;
  const int64_t d = m * dsub;
  std::vector<PackedOwner> books;
  books.reserve(static_cast<size_t>(m));
  for (int64_t j = 0; j < m; ++j) books.emplace_back(codebooks + j * ksub * dsub, ksub, dsub, d);
  const auto& kern = vq::kernels();
  // Blocks of rows; in each, chunks of 96 rows go through the m sub-quantizers in turn (the
  // chunk's rows stay in cache, one codebook's panels are read once per chunk).
  over_rows(n, ksub * d, [&](int64_t r0, int64_t r1) {
    int64_t idx[96];
    float v[96];
    for (int64_t i = r0; i < r1; i += 96) {
      const int64_t len = std::min<int64_t>(96, r1 - i);
      for (int64_t j = 0; j < m; ++j) {
        kern.assign(x + i * d + j * dsub, len, books[static_cast<size_t>(j)].packed, idx, v);
        for (int64_t r = 0; r < len; ++r) codes[(i + r) * m + j] = idx[r];
      }
    }
  });
}

void pq_adc_table(const float* q, int64_t nq, int64_t m, int64_t ksub, int64_t dsub,
                  const float* codebooks, float* table) {
  if (nq <= 0 || m <= 0 || ksub <= 0 || dsub <= 0) return;
  std::vector<float> cbt(static_cast<size_t>(m * ksub * dsub));
  for (int64_t j = 0; j < m; ++j)
    for (int64_t c = 0; c < ksub; ++c)
      for (int64_t t = 0; t < dsub; ++t)
        cbt[(j * dsub + t) * ksub + c] = codebooks[(j * ksub + c) * dsub + t];
  const auto& kern = vq::kernels();
  over_rows(nq, m * ksub * dsub, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i)
      kern.adc_table(q + i * m * dsub, m, ksub, dsub, codebooks, cbt.data(),
                     table + i * m * ksub);
  });
}

void pq_adc_scan(const float* table, int64_t nq, int64_t ksub, const uint8_t* codes, int64_t n,
                 int64_t m, float* dist) {
  scan_impl(table, nq, ksub, codes, n, m, dist);
}

void pq_adc_scan(const float* table, int64_t nq, int64_t ksub, const uint16_t* codes,
                 int64_t n, int64_t m, float* dist) {
  scan_impl(table, nq, ksub, codes, n, m, dist);
}

}  // namespace qk
