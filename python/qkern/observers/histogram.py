"""Histogram-based range searches (per tensor): PyTorch HistogramObserver's L2-minimizing
search and TensorRT's entropy (KL-divergence) calibration.

Both accumulate a fixed-size histogram over batches. When a batch widens the range, the old
counts are re-binned: each old bin is split into ``upsample_rate`` equal parts, each carrying
1/upsample_rate of its count, and every part goes to the new bin holding its midpoint.
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import torch

from .base import Observer, check_int


class RunningHistogram:
    """``bins`` equal-width bins over ``[lo, hi]``, the running min/max of what was added."""

    def __init__(self, bins: int, upsample_rate: int = 16):
        self.bins, self.upsample_rate = bins, upsample_rate
        self.reset()

    def reset(self) -> None:
        self.counts: np.ndarray | None = None
        self.lo = self.hi = 0.0

    @property
    def width(self) -> float:
        return (self.hi - self.lo) / self.bins

    def _count(self, x: torch.Tensor) -> np.ndarray:
        if self.hi > self.lo:
            h = torch.histc(x, self.bins, min=self.lo, max=self.hi)
            return h.double().cpu().numpy()
        out = np.zeros(self.bins)
        out[0] = x.numel()
        return out

    def _rebin(self, lo: float, hi: float) -> np.ndarray:
        """The current counts in ``bins`` bins over the wider ``[lo, hi]``."""
        total = self.counts.sum()
        if self.hi == self.lo:
            idx = np.array([(self.lo - lo) / (hi - lo) * self.bins])
            weights = np.array([total])
        else:
            u = self.upsample_rate
            k = np.arange(self.bins * u)
            mid = self.lo + (k + 0.5) * ((self.hi - self.lo) / (self.bins * u))
            idx = (mid - lo) / (hi - lo) * self.bins
            weights = np.repeat(self.counts / u, u)
        idx = np.clip(np.floor(idx), 0, self.bins - 1).astype(np.int64)
        return np.bincount(idx, weights=weights, minlength=self.bins)

    def add(self, x: torch.Tensor, lo: float, hi: float) -> None:
        """Count the 1-D float32 ``x`` whose min/max are ``lo``/``hi``."""
        if self.counts is None:
            self.lo, self.hi = lo, hi
            self.counts = self._count(x)
            return
        new_lo, new_hi = min(self.lo, lo), max(self.hi, hi)
        if (new_lo, new_hi) != (self.lo, self.hi):
            self.counts = self._rebin(new_lo, new_hi)
            self.lo, self.hi = new_lo, new_hi
        self.counts = self.counts + self._count(x)


# ----------------------------------------------------------------------- L2 (torch.ao's search)
def _l2_error(counts: np.ndarray, start: int, end: int, nd: int) -> float:
    """L2 error of quantizing the histogram, each source bin's count spread uniformly over it,
    to ``nd`` equal levels spanning source bins ``start..end`` (level centres; values outside
    saturate to the end levels), with lengths in source-bin widths (a constant factor)."""
    w = (end - start + 1) / nd  # destination bin width
    if w == 0.0:
        return 0.0
    a = np.arange(counts.size, dtype=np.float64) - start
    # F(x) = integral from the clip start to x of (t - Q(t))^2 dt, Q = nearest clamped centre
    def cum(x):
        k = np.clip(np.floor(x / w), 0, nd - 1)
        return k * (w**3 / 12) + ((x - (k + 0.5) * w) ** 3 + (w / 2) ** 3) / 3

    return float(np.dot(counts, cum(a + 1.0) - cum(a)))


def l2_range_search(counts: np.ndarray, nd: int, step: float = 1e-5) -> tuple[int, int]:
    """First and last histogram bin of the range PyTorch's HistogramObserver picks: walk the
    lower and upper quantiles inward by ``step``; each time, move whichever end that gains more
    bins; stop as soon as the L2 error grows. Returns (start_bin, end_bin)."""
    bins = counts.size
    # cumulative counts and quantile targets compare in float32, as in torch.ao: with a round
    # total (say 10^6) the targets are integers up to the rounding of alpha's sum of steps
    csum = np.cumsum(counts.astype(np.float32), dtype=np.float32)
    total = float(csum[-1])
    csum = csum.tolist()
    f32 = np.float32
    alpha, beta = 0.0, 1.0
    start, end = 0, bins - 1
    best = math.inf
    while alpha < beta:
        next_alpha, next_beta = alpha + step, beta - step
        left = bisect.bisect_left(csum, float(f32(next_alpha * total)), start, end)
        right = bisect.bisect_right(csum, float(f32(next_beta * total)), start + 1, end + 1) - 1
        next_start, next_end = start, end
        if left - start > end - right:
            next_start, alpha = left, next_alpha
        else:
            next_end, beta = right, next_beta
        if (next_start, next_end) == (start, end):
            continue
        err = _l2_error(counts, next_start, next_end, nd)
        if err > best:
            break
        best, start, end = err, next_start, next_end
    return start, end


class HistogramObserver(Observer):
    """PyTorch HistogramObserver's range: a ``bins``-bin histogram of ``x`` over the running
    min/max, then the L2-minimizing search of ``l2_range_search`` with ``2^bits`` destination
    levels. Integer formats, per tensor."""

    supports_channel = False

    def __init__(self, fmt="int8", *, bins: int = 2048, upsample_rate: int = 16, **kw):
        super().__init__(fmt, **kw)
        if self.format.kind != "int":
            raise ValueError(f"HistogramObserver supports integer formats, not {self.format.name}")
        self.bins = check_int("bins", bins, 1, 1 << 20)
        self.upsample_rate = check_int("upsample_rate", upsample_rate, 1, 1024)
        self.hist = RunningHistogram(self.bins, self.upsample_rate)

    def _observe(self, rows: torch.Tensor) -> None:
        x = rows.reshape(-1)
        lo, hi = torch.aminmax(x)
        self.hist.add(x, float(lo), float(hi))

    def _range(self):
        h = self.hist
        if h.hi == h.lo:
            return torch.tensor([h.lo]), torch.tensor([h.hi])
        start, end = l2_range_search(h.counts, self.format.qmax - self.format.qmin + 1)
        width = h.width
        return torch.tensor([h.lo + width * start]), torch.tensor([h.lo + width * (end + 1)])

    def _reset_stats(self) -> None:
        self.hist.reset()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bins={self.bins}"


# ------------------------------------------------------------------------ KL (TensorRT entropy)
def kl_threshold_bin(counts: np.ndarray, levels: int, start_bin: int) -> int:
    """The number of histogram bins ``i`` (``start_bin <= i <= bins``) whose clipped
    distribution loses least information when quantized to ``levels`` levels:

    - P = counts[:i], with every count beyond (the outliers) added to P[i-1];
    - Q: bins 0..i-1 merged into ``levels`` levels (bin k in level floor(k * levels / i)), each
      level's total of counts[:i] (no outliers) spread equally over its bins where P > 0;
    - KL(P || Q) of the normalized P and Q (infinite where Q = 0 < P).
    Ties go to the larger ``i``."""
    bins = counts.size
    best_i, best_kl = bins, math.inf
    j = np.arange(levels)
    for i in range(start_bin, bins + 1):
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()
        nz = p > 0
        first = (j * i + levels - 1) // levels  # first bin of each level
        mass = np.add.reduceat(counts[:i], first)
        n_nz = np.add.reduceat(nz.astype(np.int64), first)
        per_bin = mass / np.maximum(n_nz, 1)
        q = np.where(nz, np.repeat(per_bin, np.diff(np.append(first, i))), 0.0)
        if (q[nz] == 0).any() or q.sum() == 0:
            continue
        pn, qn = p[nz] / p.sum(), q[nz] / q.sum()
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl <= best_kl:
            best_i, best_kl = i, kl
    return best_i


class KLObserver(Observer):
    """TensorRT's entropy calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017): a
    ``bins``-bin histogram of ``|x|`` over ``[0, max|x|]``, accumulated over batches; the
    threshold ``(m + 0.5) * bin_width`` (at most max|x|) for the ``m`` of ``kl_threshold_bin``
    with ``qmax + 1`` levels (128 for int8); the range is ``(-threshold, threshold)``.
    Symmetric integer formats, per tensor."""

    supports_channel = False

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
        a = rows.reshape(-1).abs()
        self.hist.add(a, 0.0, float(a.max()))

    @property
    def histogram(self) -> torch.Tensor:
        """The accumulated |x| counts (float64) over ``[0, max|x|]``."""
        self._check_seen()
        return torch.from_numpy(self.hist.counts.copy())

    def _range(self):
        h = self.hist
        m = kl_threshold_bin(h.counts, self.levels, self.start_bin)
        t = min((m + 0.5) * h.width, h.hi)
        return torch.tensor([-t]), torch.tensor([t])

    def _reset_stats(self) -> None:
        self.hist.reset()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bins={self.bins}, start_bin={self.start_bin}"
