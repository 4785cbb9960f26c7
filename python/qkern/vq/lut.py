"""Learned non-uniform scalar grids (SqueezeLLM's look-up-table quantization: Kim et al.,
"SqueezeLLM: Dense-and-Sparse Quantization", 2023): each row of a weight matrix, or each group of
``group_size`` consecutive values of a row, gets its own table of ``2**bits`` levels, fitted by
weighted 1-D k-means (weights: a sensitivity such as the Fisher information or the Hessian
diagonal), and each value is coded as the index of its nearest level."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import VQBase, as_codes, as_vectors

__all__ = ["LUTQuantizer", "weighted_kmeans_1d"]


def _rowwise_searchsorted(sorted_rows: np.ndarray, queries: np.ndarray,
                          right: bool) -> np.ndarray:
    """For each row i, ``np.searchsorted(sorted_rows[i], queries[i], side)`` (batched,
    exact: torch's searchsorted takes a batch of sorted rows)."""
    idx = torch.searchsorted(torch.from_numpy(np.ascontiguousarray(sorted_rows)),
                             torch.from_numpy(np.ascontiguousarray(queries)), right=right)
    return idx.numpy()


def weighted_kmeans_1d(values: Any, weights: Any = None, k: int = 16,
                       max_iter: int = 100) -> np.ndarray:
    """Weighted 1-D k-means of each row of ``values`` (G, m): the (G, k) sorted levels that
    (locally) minimize ``sum_j w_j (v_j - level(v_j))**2`` per row, ``level`` the nearest one.

    Lloyd's algorithm on the sorted values, every row at once: levels start at the weighted
    quantiles ``(j + 1/2) / k``; a value goes to the level whose interval between the midpoints
    of consecutive levels holds it (a value on a midpoint to the lower level), and each level
    becomes its cluster's weighted mean (prefix sums; a level without weight stays). At a fixed
    point of Lloyd's iteration, where plain Lloyd often stalls tens of % above the optimum,
    Hartigan's moves (a value at a cluster's edge goes to the neighbouring cluster when that
    lowers the objective, counting the shift of both means) or else a split-and-merge move
    (the best split of one cluster in two against the cheapest merge of two neighbouring ones;
    it also puts idle duplicate levels to use) lower the objective, and Lloyd resumes. Stops
    when no row changes, or after ``max_iter`` iterations. The objective never increases from
    one iteration to the next. Rows whose weights sum to 0 are fitted unweighted.

    >>> weighted_kmeans_1d(np.array([[0.0, 0.1, 1.0, 1.2, 5.0]]), k=3).round(2).tolist()
    [[0.05, 1.1, 5.0]]
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] == 0:
        raise ValueError(f"values must be (rows, m) with m >= 1, got shape {v.shape}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if weights is None:
        w = np.ones_like(v)
    else:
        w = np.array(weights, dtype=np.float64)
        if w.shape != v.shape:
            raise ValueError(f"weights have shape {w.shape}, values {v.shape}")
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and >= 0")
        w[w.sum(axis=1) == 0] = 1.0
    order = np.argsort(v, axis=1, kind="stable")
    v = np.take_along_axis(v, order, axis=1)
    w = np.take_along_axis(w, order, axis=1)
    n_rows, m = v.shape
    zero = np.zeros((n_rows, 1))
    cw = np.concatenate([zero, np.cumsum(w, axis=1)], axis=1)
    cwv = np.concatenate([zero, np.cumsum(w * v, axis=1)], axis=1)
    cwvv = np.concatenate([zero, np.cumsum(w * v * v, axis=1)], axis=1)

    targets = (np.arange(k) + 0.5) / k * cw[:, -1:]
    idx = np.minimum(_rowwise_searchsorted(cw[:, 1:], targets, right=False), m - 1)
    levels = np.take_along_axis(v, idx, axis=1)

    tol = 1e-12 * cwvv[:, -1]  # a Hartigan or split-and-merge move must gain more than this
    # the working set: rows not yet converged (and some that have, until it is compacted)
    rows = np.arange(n_rows)
    ws = [v, w, cw, cwv, cwvv, tol, levels.copy(), np.full((n_rows, k + 1), -1, np.int64)]
    for _ in range(max_iter):
        if not len(rows):
            break
        va, wa, cwa, cwva, cwvva, tola, c, bounds_prev = ws
        mids = (c[:, 1:] + c[:, :-1]) / 2
        inner = _rowwise_searchsorted(va, mids, right=True)
        bounds = np.concatenate([np.zeros((len(rows), 1), np.int64), inner,
                                 np.full((len(rows), 1), m, np.int64)], axis=1)
        new = np.sort(_means(cwa, cwva, bounds, c)[0], axis=1)
        done = (bounds == bounds_prev).all(axis=1)
        bounds_prev[:] = bounds
        if done.any():  # Lloyd's fixed points: Hartigan's moves, else split and merge
            r = np.nonzero(done)[0]
            hb = bounds[r]
            for parity in (0, 1):
                hb = _hartigan(va[r], wa[r], cwa[r], cwva[r], hb, tola[r], parity)
            same = np.nonzero((hb == bounds[r]).all(axis=1))[0]
            hb[same] = _split_merge(cwa[r[same]], cwva[r[same]], cwvva[r[same]],
                                    bounds[r[same]], tola[r[same]])
            hmoved = (hb != bounds[r]).any(axis=1)
            r, hb = r[hmoved], hb[hmoved]
            new[r] = np.sort(_means(cwa[r], cwva[r], hb, new[r])[0], axis=1)
            bounds_prev[r] = hb
            done[r] = False
        c[:] = new
        levels[rows] = new
        if done.all():
            break
        if done.mean() > 0.25:
            ws = [a[~done] for a in ws]
            rows = rows[~done]
    return levels


def _means(cw: np.ndarray, cwv: np.ndarray, bounds: np.ndarray,
           old: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The weighted means of the runs ``[bounds[j], bounds[j+1])`` of sorted values (``old``
    where a run has no weight) from prefix sums, and the runs' weights."""
    sw = np.diff(np.take_along_axis(cw, bounds, axis=1), axis=1)
    swv = np.diff(np.take_along_axis(cwv, bounds, axis=1), axis=1)
    return np.where(sw > 0, swv / np.where(sw > 0, sw, 1.0), old), sw


def _hartigan(v: np.ndarray, w: np.ndarray, cw: np.ndarray, cwv: np.ndarray,
              bounds: np.ndarray, tol: np.ndarray, parity: int) -> np.ndarray:
    """One pass of Hartigan's moves over the boundaries ``parity, parity + 2, ...`` (no two
    share a run): the value on either side of a boundary moves to the other run when that
    lowers the objective, counting the shift of both runs' means, by more than ``tol``."""
    k = bounds.shape[1] - 1
    j = np.arange(parity, k - 1, 2)
    if not len(j):
        return bounds
    mean, sw = _means(cw, cwv, bounds, np.zeros(bounds[:, 1:].shape))
    lo, b, hi = bounds[:, j], bounds[:, j + 1], bounds[:, j + 2]
    w0, w1, c0, c1 = sw[:, j], sw[:, j + 1], mean[:, j], mean[:, j + 1]
    rows = np.arange(len(v))[:, None]
    m = v.shape[1]

    def gain(idx, w_from, c_from, w_to, c_to, ok):
        i = np.clip(idx, 0, m - 1)
        x, u = v[rows, i], w[rows, i]
        ok = ok & (w_from - u > 0) & (u > 0)
        rest = np.where(ok, w_from - u, 1.0)
        g = w_to * u / (w_to + u) * (x - c_to) ** 2 - w_from * u / rest * (x - c_from) ** 2
        return np.where(ok, g, np.inf)

    down = gain(b - 1, w0, c0, w1, c1, b - 1 > lo)  # last of run j -> run j+1
    up = gain(b, w1, c1, w0, c0, b + 1 < hi)  # first of run j+1 -> run j
    best = np.minimum(down, up)
    step = np.where(best < -tol[:, None], np.where(down <= up, -1, 1), 0)
    out = bounds.copy()
    out[:, j + 1] += step
    return out


def _sse(cw: np.ndarray, cwv: np.ndarray, cwvv: np.ndarray, i: np.ndarray,
         j: np.ndarray) -> np.ndarray:
    """Weighted sum of squared deviations from the mean of the runs [i, j) of each row."""
    def run(c):
        return np.take_along_axis(c, j, axis=1) - np.take_along_axis(c, i, axis=1)
    sw, swv = run(cw), run(cwv)
    return np.maximum(run(cwvv) - swv * swv / np.where(sw > 0, sw, 1.0), 0.0)


def _split_merge(cw: np.ndarray, cwv: np.ndarray, cwvv: np.ndarray, bounds: np.ndarray,
                 tol: np.ndarray) -> np.ndarray:
    """One split-and-merge move per row: the best split of one run in two against the
    cheapest merge of two neighbouring (other) runs, made when it lowers the objective by more
    than ``tol``. Returns the new bounds (unchanged rows where no move gains)."""
    n_rows, k1 = bounds.shape
    k, m = k1 - 1, cw.shape[1] - 1
    if k < 2 or m < 2:
        return bounds
    p = np.broadcast_to(np.arange(1, m), (n_rows, m - 1))
    run = _rowwise_searchsorted(bounds.astype(np.float64), p.astype(np.float64), True) - 1
    lo = np.take_along_axis(bounds, run, axis=1)
    hi = np.take_along_axis(bounds, run + 1, axis=1)
    gain = _sse(cw, cwv, cwvv, lo, hi) - _sse(cw, cwv, cwvv, lo, p) - _sse(cw, cwv, cwvv, p, hi)
    gain[lo == p] = -np.inf  # already a boundary
    best_p = np.argmax(gain, axis=1)
    rows = np.arange(n_rows)
    g, split_run = gain[rows, best_p], run[rows, best_p]
    a, b, c = bounds[:, :-2], bounds[:, 1:-1], bounds[:, 2:]
    cost = _sse(cw, cwv, cwvv, a, c) - _sse(cw, cwv, cwvv, a, b) - _sse(cw, cwv, cwvv, b, c)
    pair = np.arange(k - 1)[None, :]
    cost[(pair == split_run[:, None]) | (pair == split_run[:, None] - 1)] = np.inf
    best_pair = np.argmin(cost, axis=1)
    do = g - cost[rows, best_pair] > tol
    if not do.any():
        return bounds
    out = bounds.copy()
    out[do, best_pair[do] + 1] = best_p[do] + 1  # drop the merged boundary, add the split
    out[do] = np.sort(out[do], axis=1)
    return out


class LUTQuantizer(VQBase):
    """A learned non-uniform scalar grid per row (or per ``group_size`` consecutive values of a
    row) of a weight matrix ``x`` (rows, d): ``2**bits`` levels each, fitted by
    :func:`weighted_kmeans_1d` (``train(x, weights=None)``; ``weights`` the sensitivity of each
    entry, same shape as ``x``, e.g. the Fisher / Hessian diagonal). ``encode`` gives each value
    the index of its nearest level (codes (rows, d) in [0, 2**bits)); ``decode`` looks them up.

    The tables belong to the rows of the trained matrix, so ``encode`` / ``decode`` take a
    matrix of that same shape (another row count raises ValueError). ``code_size_bits`` is
    ``d * bits`` (one row); the tables (rows, d / group_size, 2**bits) float32 are the
    ``state()["levels"]``.

    >>> import numpy as np
    >>> w = np.random.default_rng(0).standard_t(4, size=(64, 256)).astype(np.float32)
    >>> q = LUTQuantizer(256, bits=3, group_size=128).train(w)  # or weights=<sensitivity>
    >>> codes = q.encode(w); codes.shape, int(codes.max()) < 8
    ((64, 256), True)
    >>> float(((q.decode(codes) - w) ** 2).mean()) < 0.06 * float(w.var())
    True
    """

    kind = "lut"

    def __init__(self, d: int, bits: int = 4, group_size: int | None = None):
        super().__init__(d)
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
        if group_size is not None:
            if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
                raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
            if d % group_size:
                raise ValueError(f"group_size {group_size} does not divide d = {d}")
        self.bits, self.group_size = bits, group_size
        self.k = 2 ** bits
        self.gs = d if group_size is None else group_size
        self.groups = d // self.gs
        self.levels: np.ndarray | None = None  # (rows, groups, k) float32, sorted

    @property
    def rows(self) -> int | None:
        """The row count of the trained matrix (None before training)."""
        return None if self.levels is None else self.levels.shape[0]

    def train(self, x: Any, weights: Any = None, max_iter: int = 100) -> LUTQuantizer:
        """Fits the tables of ``x`` (rows, d), weighted by ``weights`` (same shape, >= 0)."""
        return super().train(x, weights=weights, max_iter=max_iter)

    def _train(self, x: np.ndarray, weights: Any = None, max_iter: int = 100) -> None:
        w = None
        if weights is not None:
            w = as_vectors(weights, self.d, "weights")
            if w.shape != x.shape:
                raise ValueError(f"weights have shape {w.shape}, x has {x.shape}")
            if (w < 0).any():
                raise ValueError("weights must be >= 0")
            w = w.reshape(-1, self.gs)
        lv = weighted_kmeans_1d(x.reshape(-1, self.gs), w, self.k, max_iter)
        self.levels = lv.astype(np.float32).reshape(x.shape[0], self.groups, self.k)

    def _check_rows(self, n: int, what: str) -> None:
        if n != self.rows:
            raise ValueError(f"{what} has {n} rows; the tables were trained for a matrix of "
                             f"{self.rows} rows (LUTQuantizer codes that same matrix shape)")

    def _encode(self, x: np.ndarray) -> np.ndarray:
        self._check_rows(x.shape[0], "x")
        lv = self.levels.reshape(-1, self.k).astype(np.float64)
        mids = (lv[:, 1:] + lv[:, :-1]) / 2
        codes = _rowwise_searchsorted(mids, x.reshape(-1, self.gs).astype(np.float64), False)
        return codes.reshape(x.shape).astype(np.int64)

    def _decode(self, codes: Any) -> np.ndarray:
        c = as_codes(codes, self.d, self.k)
        self._check_rows(c.shape[0], "codes")
        lv = self.levels.reshape(-1, self.k)
        return np.take_along_axis(lv, c.reshape(-1, self.gs), axis=1).reshape(c.shape)

    @property
    def code_size_bits(self) -> int:
        return self.d * self.bits

    def config(self) -> dict:
        return {"d": self.d, "bits": self.bits, "group_size": self.group_size}

    def state(self) -> dict[str, torch.Tensor]:
        return {} if self.levels is None else {"levels": torch.from_numpy(self.levels)}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        lv = tensors.get("levels")
        if set(tensors) != {"levels"} or lv.ndim != 3 or tuple(lv.shape[1:]) != (
                self.groups, self.k):
            raise ValueError(f"LUTQuantizer: expected one tensor 'levels' of shape (rows, "
                             f"{self.groups}, {self.k}), got {sorted(tensors)}")
        self.levels = lv.to(torch.float32).numpy().copy()
