"""Histogram-based range searches, per tensor or per channel: PyTorch HistogramObserver's
L2-minimizing search and TensorRT's entropy (KL-divergence) calibration.

Both accumulate a fixed-size histogram over batches, one row per channel (one row for per
tensor: the same code with C = 1). When a batch widens a channel's range, that channel's old
counts are re-binned: each old bin is split into ``upsample_rate`` equal parts, each carrying
1/upsample_rate of its count, and every part goes to the new bin holding its midpoint.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import Observer, check_int

_REBIN_CHUNK = 1 << 16  # (channel, bin) elements per block of the re-binning (in cache)
_KL_CHUNK = 1 << 16  # (candidate, level, channel) elements per block of the KL search


class RunningHistogram:
    """Per row (channel) ``bins`` equal-width bins over ``[lo, hi]``, the running min/max of
    what was added: ``counts`` (C, bins) float64, ``lo`` / ``hi`` (C,) float64."""

    def __init__(self, bins: int, upsample_rate: int = 16):
        self.bins, self.upsample_rate = bins, upsample_rate
        self.reset()

    def reset(self) -> None:
        self.counts: np.ndarray | None = None
        self.lo = self.hi = np.zeros(0)

    @property
    def width(self) -> np.ndarray:
        return (self.hi - self.lo) / self.bins

    def _count(self, rows: torch.Tensor) -> np.ndarray:
        """(C, bins) counts of float32 ``rows`` (C, n) over the current ranges, binned exactly
        as ``torch.histc`` bins (float32 ``(x - lo) * bins / (hi - lo)``, truncated, the top
        edge in the last bin); a channel with ``lo == hi`` has everything in bin 0."""
        c, n = rows.shape
        lo = torch.from_numpy(self.lo).float().reshape(c, 1)
        hi = torch.from_numpy(self.hi).float().reshape(c, 1)
        span = hi - lo
        pos = ((rows - lo) * self.bins / torch.where(span > 0, span, 1.0)).long()
        pos = pos.clamp_(0, self.bins - 1).masked_fill_(span == 0, 0)
        pos += torch.arange(c).reshape(c, 1) * self.bins
        counts = torch.bincount(pos.reshape(-1), minlength=c * self.bins)
        return counts.reshape(c, self.bins).double().numpy()

    def _rebin(self, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """The counts of channels ``rows`` in ``bins`` bins over the wider ``[lo, hi]``.

        The parts of one old bin lie within less than one new bin width (the new range holds
        the old one), so they land in at most two new bins, the first ones in the bin of part
        0 and the rest in the bin of part u-1: the split is found by bisection over the parts,
        each part's bin computed as the definition says (its midpoint)."""
        b, u = self.bins, self.upsample_rate
        out = np.empty((rows.size, b))
        step = max(1, _REBIN_CHUNK // b)
        first = np.arange(b)[None, :] * u  # each old bin's first part
        for s in range(0, rows.size, step):
            r = rows[s:s + step]
            olo, part = self.lo[r, None], (self.hi[r, None] - self.lo[r, None]) / (b * u)
            nlo, span = lo[s:s + step, None], hi[s:s + step, None] - lo[s:s + step, None]

            def new_bin(t, olo=olo, part=part, nlo=nlo, span=span):
                mid = olo + (first + t + 0.5) * part  # a one-value channel: part = 0
                return np.clip(np.floor((mid - nlo) / span * b), 0, b - 1)

            i0, i1 = new_bin(0), new_bin(u - 1)
            below, above = np.zeros_like(i0), np.full_like(i0, float(u))  # i0 at below
            for _ in range(max(0, math.ceil(math.log2(u)))):
                m = np.floor((below + above) / 2)
                same = new_bin(m) == i0
                below, above = np.where(same, m, below), np.where(same, above, m)
            w0 = self.counts[r] * ((below + 1) / u)  # parts 0..below in bin i0
            k = r.size
            off = np.arange(k)[:, None] * b
            idx = np.concatenate([(i0 + off).reshape(-1), (i1 + off).reshape(-1)])
            w = np.concatenate([w0.reshape(-1), (self.counts[r] - w0).reshape(-1)])
            out[s:s + step] = np.bincount(idx.astype(np.int64), weights=w,
                                          minlength=k * b).reshape(k, b)
        return out

    def add(self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Count the float32 ``rows`` (C, n) whose row min/max are ``lo``/``hi`` (C,)."""
        lo, hi = lo.double().numpy(), hi.double().numpy()
        if self.counts is None:
            self.lo, self.hi = lo, hi
            self.counts = self._count(rows)
            return
        new_lo, new_hi = np.minimum(self.lo, lo), np.maximum(self.hi, hi)
        wider = np.flatnonzero((new_lo != self.lo) | (new_hi != self.hi))
        if wider.size:
            self.counts[wider] = self._rebin(wider, new_lo[wider], new_hi[wider])
            self.lo, self.hi = new_lo, new_hi
        self.counts += self._count(rows)


# ----------------------------------------------------------------------- L2 (torch.ao's search)
def _l2_error(counts: np.ndarray, start: np.ndarray, end: np.ndarray, nd: int) -> np.ndarray:
    """Per row, the L2 error of quantizing the histogram ``counts`` (k, bins), each source
    bin's count spread uniformly over it, to ``nd`` equal levels spanning source bins
    ``start..end`` (level centres; values outside saturate to the end levels), with lengths in
    source-bin widths (a constant factor)."""
    w = ((end - start + 1) / nd)[:, None]  # destination bin width
    a = np.arange(counts.shape[1], dtype=np.float64)[None, :] - start[:, None]

    # F(x) = integral from the clip start to x of (t - Q(t))^2 dt, Q = nearest clamped centre
    def cum(x):
        k = np.clip(np.floor(x / w), 0, nd - 1)
        return k * (w**3 / 12) + ((x - (k + 0.5) * w) ** 3 + (w / 2) ** 3) / 3

    return (counts * (cum(a + 1.0) - cum(a))).sum(1)


def l2_range_search(counts: np.ndarray, nd: int, step: float = 1e-5):
    """First and last histogram bin of the range PyTorch's HistogramObserver picks: walk the
    lower and upper quantiles inward by ``step``; each time, move whichever end that gains more
    bins; stop as soon as the L2 error grows. ``counts`` (bins,) gives (start_bin, end_bin);
    (C, bins) gives two (C,) int arrays, every row searched on its own (in lockstep)."""
    if counts.ndim == 1:
        s, e = l2_range_search(counts[None], nd, step)
        return int(s[0]), int(e[0])
    c, bins = counts.shape
    # cumulative counts and quantile targets compare in float32, as in torch.ao: with a round
    # total (say 10^6) the targets are integers up to the rounding of alpha's sum of steps
    csum = torch.from_numpy(np.cumsum(counts.astype(np.float32), axis=1, dtype=np.float32))
    total = csum[:, -1].double().numpy()
    alpha, beta = np.zeros(c), np.ones(c)
    start, end = np.zeros(c, np.int64), np.full(c, bins - 1, np.int64)
    best = np.full(c, math.inf)
    live = np.flatnonzero(alpha < beta)
    while live.size:
        next_alpha, next_beta = alpha + step, beta - step
        qa = torch.from_numpy((next_alpha * total).astype(np.float32)[:, None])
        qb = torch.from_numpy((next_beta * total).astype(np.float32)[:, None])
        left = torch.searchsorted(csum, qa).numpy()[live, 0]
        right = torch.searchsorted(csum, qb, right=True).numpy()[live, 0]
        st, en = start[live], end[live]
        left, right = np.clip(left, st, en), np.clip(right, st + 1, en + 1) - 1
        move_left = left - st > en - right
        alpha[live[move_left]] = next_alpha[live[move_left]]
        beta[live[~move_left]] = next_beta[live[~move_left]]
        ns, ne = np.where(move_left, left, st), np.where(move_left, en, right)
        changed = (ns != st) | (ne != en)
        rows, ns, ne = live[changed], ns[changed], ne[changed]
        if rows.size:
            err = _l2_error(counts[rows], ns, ne, nd)
            ok = err <= best[rows]
            best[rows[ok]], start[rows[ok]], end[rows[ok]] = err[ok], ns[ok], ne[ok]
            alpha[rows[~ok]] = beta[rows[~ok]]  # stopped: the error grew
        live = live[alpha[live] < beta[live]]
    return start, end


# ------------------------------------------------------------------------ KL (TensorRT entropy)
def _xlogx(v: np.ndarray) -> np.ndarray:
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


def kl_threshold_bin(counts: np.ndarray, levels: int, start_bin: int):
    """The number of histogram bins ``i`` (``start_bin <= i <= bins``) whose clipped
    distribution loses least information when quantized to ``levels`` levels:

    - P = counts[:i], with every count beyond (the outliers) added to P[i-1];
    - Q: bins 0..i-1 merged into ``levels`` levels (bin k in level floor(k * levels / i)), each
      level's total of counts[:i] (no outliers) spread equally over its bins where P > 0;
    - KL(P || Q) of the normalized P and Q (infinite where Q = 0 < P).
    Ties go to the larger ``i``. ``counts`` (bins,) gives an int; (C, bins) a (C,) int array,
    one search per row.

    Computed from prefix sums: with S the total, T the outliers, M_j / n_j / P_j level j's
    mass, nonzero bins and P mass, KL = (sum_k p_k log p_k - sum_j P_j log(M_j / n_j)) / S
    - log S + log(S - T)."""
    if counts.ndim == 1:
        return int(kl_threshold_bin(counts[None], levels, start_bin)[0])
    c, bins = counts.shape
    counts = np.ascontiguousarray(counts.T, dtype=np.float64)  # (bins, c): rows gather fast
    zero = np.zeros((1, c))
    cs = np.concatenate([zero, np.cumsum(counts, 0)])  # cs[k] = sum of counts[:k]
    cl = np.concatenate([zero, np.cumsum(_xlogx(counts), 0)])
    nzc = np.concatenate([zero, np.cumsum(counts > 0, 0)]).astype(np.int64)
    log_n = np.log(np.maximum(np.arange(bins + 1), 1))
    total = cs[-1]
    cand = np.arange(start_bin, bins + 1)
    kl = np.empty((cand.size, c))
    j = np.arange(levels + 1)
    step = max(1, _KL_CHUNK // (levels * c))
    for s in range(0, cand.size, step):
        i = cand[s:s + step]  # (m,)
        f = (j[None, :] * i[:, None] + levels - 1) // levels  # (m, L+1) level edges, f[:, L] = i
        g, gn = cs[f], nzc[f]  # (m, L+1, c)
        mass, nnz = g[:, 1:] - g[:, :-1], gn[:, 1:] - gn[:, :-1]
        inside = cs[i]  # (m, c)
        outl, last = total - inside, counts[i - 1]
        p_last = last + outl
        nnz[:, -1] += (p_last > 0).astype(np.int64) - (last > 0)
        # M log(M / n) (0 where M = 0: then P = 0 too, but for the outliers, added below)
        t = np.log(np.maximum(mass, 1e-300))
        t -= log_n[nnz]
        t *= mass
        term = t.sum(1) + outl * (np.log(np.maximum(mass[:, -1], 1e-300)) - log_n[nnz[:, -1]])
        val = ((cl[i - 1] + _xlogx(p_last) - term) / total - np.log(total)
               + np.log(np.where(inside > 0, inside, 1.0)))
        # Q = 0 < P only in the last level (the outliers' bin); Q all zero: nothing inside
        bad = ((nnz[:, -1] > 0) & (mass[:, -1] == 0)) | (inside == 0)
        kl[s:s + i.size] = np.where(bad, math.inf, val)
    rev = kl[::-1]  # ties to the larger i: the first minimum from the end
    pick = cand.size - 1 - np.argmin(rev, 0)
    return np.where(np.isinf(rev).all(0), bins, cand[pick])


class HistogramObserver(Observer):
    """PyTorch HistogramObserver's range: a ``bins``-bin histogram of ``x`` over the running
    min/max (per channel with granularity ``"channel"``), then the L2-minimizing search of
    ``l2_range_search`` with ``2^bits`` destination levels. Integer formats."""

    def __init__(self, fmt="int8", *, bins: int = 2048, upsample_rate: int = 16, **kw):
        super().__init__(fmt, **kw)
        if self.format.kind != "int":
            raise ValueError(f"HistogramObserver supports integer formats, not {self.format.name}")
        self.bins = check_int("bins", bins, 1, 1 << 20)
        self.upsample_rate = check_int("upsample_rate", upsample_rate, 1, 1024)
        self.hist = RunningHistogram(self.bins, self.upsample_rate)

    def _observe(self, rows: torch.Tensor) -> None:
        self.hist.add(rows, *torch.aminmax(rows, dim=1))

    def _range(self):
        h = self.hist
        lo, hi = h.lo.copy(), h.hi.copy()
        rows = np.flatnonzero(hi > lo)
        if rows.size:
            start, end = l2_range_search(h.counts[rows], self.format.qmax - self.format.qmin + 1)
            width = h.width[rows]
            lo[rows], hi[rows] = h.lo[rows] + width * start, h.lo[rows] + width * (end + 1)
        return torch.from_numpy(lo), torch.from_numpy(hi)

    def _reset_stats(self) -> None:
        self.hist.reset()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bins={self.bins}"


class KLObserver(Observer):
    """TensorRT's entropy calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017): a
    ``bins``-bin histogram of ``|x|`` over ``[0, max|x|]`` (per channel with granularity
    ``"channel"``), accumulated over batches; the threshold ``(m + 0.5) * bin_width`` (at most
    max|x|) for the ``m`` of ``kl_threshold_bin`` with ``qmax + 1`` levels (128 for int8); the
    range is ``(-threshold, threshold)``. Symmetric integer formats."""

    def __init__(self, fmt="int8", *, bins: int = 2048, start_bin: int = 128,
                 upsample_rate: int = 16, **kw):
        super().__init__(fmt, **kw)
        if self.format.kind != "int" or not self.symmetric:
            raise ValueError("KLObserver needs a symmetric integer format (e.g. 'int8', "
                             f"symmetric=True), got {self.format.name}, "
                             f"symmetric={self.symmetric}")
        self.levels = self.format.qmax + 1
        self.start_bin = check_int("start_bin", start_bin, self.levels)
        self.bins = check_int("bins", bins, self.start_bin, 1 << 20)
        self.upsample_rate = check_int("upsample_rate", upsample_rate, 1, 1024)
        self.hist = RunningHistogram(self.bins, self.upsample_rate)

    def _observe(self, rows: torch.Tensor) -> None:
        a = rows.abs()
        top = a.amax(1)
        self.hist.add(a, torch.zeros_like(top), top)

    @property
    def histogram(self) -> torch.Tensor:
        """The accumulated |x| counts (float64) over ``[0, max|x|]``: (bins,) per tensor,
        (channels, bins) per channel."""
        self._check_seen()
        h = torch.from_numpy(self.hist.counts.copy())
        return h[0] if self.granularity == "tensor" else h

    def _range(self):
        h = self.hist
        m = kl_threshold_bin(h.counts, self.levels, self.start_bin)
        t = np.minimum((m + 0.5) * h.width, h.hi)
        return torch.from_numpy(-t), torch.from_numpy(t)

    def _reset_stats(self) -> None:
        self.hist.reset()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bins={self.bins}, start_bin={self.start_bin}"
