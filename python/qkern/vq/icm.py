"""Encoding for additive codebooks by local search (LSQ, Martinez et al. 2016 / 2018, as FAISS's
``LocalSearchQuantizer`` does it): iterated conditional modes (ICM) inside an iterated local
search (ILS).

A code (n, m) of ``codebooks`` (m, K, d) reconstructs ``x`` as ``sum_j codebooks[j, b_j]``.

- :func:`icm`: ``icm_iters`` sweeps; in a sweep each codebook j in turn (0..m-1) takes, for
  each vector, the entry c minimizing the squared error with the other codes fixed, from
  look-up tables as FAISS's ``icm_encode_step``: the unary terms ``||c_jc||^2 - 2 x.c_jc``
  (once per vector) plus twice the sum over i != j of the pair terms ``<c_{i b_i}, c_jc>``
  (:func:`qkern.vq.search.rq_cross_table` of the codebooks: once per codebooks), an O(m K)
  scan instead of an O(K d) search (C++, ``_C.icm_encode_raw``; float order and ties: the
  lowest c of the smallest float32 value, csrc/cpu/vq/api.h). A vector stops at a fixed point
  (a sweep that changed nothing: the next would see the same values).
- :func:`ils`: ``ils_iters`` rounds of (perturb ``nperts`` codes of each vector's best code so
  far: a random codebook, a random entry, drawn from the seeded generator ``rng``, round by
  round as before, and passed to C++; then ICM); a vector keeps the new code only where it
  lowers its squared error (float64). The result is never worse than the starting codes.

Codebooks whose cross table would exceed :data:`qkern.vq.search.LUT_MAX_FLOATS` floats (the
RQ's look-up-table limit) use the search path instead: each ICM step a nearest-centroid search
(:func:`qkern.vq.search.assign`) of the float32 residual (a float64 running sum of the chosen
entries rounded to float32), the ILS loop in numpy on the same draws. Either path gives the
same codes on every run, ISA and thread count for a given ``rng`` state.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> books = rng.standard_normal((3, 16, 4)).astype(np.float32)
>>> x = rng.standard_normal((100, 4)).astype(np.float32)
>>> start = np.zeros((100, 3), dtype=np.int64)
>>> codes = ils(x, books, start, ils_iters=4, icm_iters=4, nperts=1, rng=rng)
>>> bool(sq_errors(x, books, codes).mean() < sq_errors(x, books, start).mean())
True
"""

from __future__ import annotations

import numpy as np

from .. import _C
from .search import assign, lut_fits, rq_cross_table

__all__ = ["icm", "ils", "sq_errors", "reconstruct64"]


def reconstruct64(codebooks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``sum_j codebooks[j, codes[:, j]]`` (n, d) in float64, summed in codebook order."""
    out = np.zeros((codes.shape[0], codebooks.shape[2]))
    for j in range(codebooks.shape[0]):
        out += codebooks[j][codes[:, j]]
    return out


def sq_errors(x: np.ndarray, codebooks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Squared reconstruction error (n,) float64 of each row of ``x`` under ``codes``."""
    return ((x.astype(np.float64) - reconstruct64(codebooks, codes)) ** 2).sum(1)


def _check(x: np.ndarray, codebooks: np.ndarray, codes: np.ndarray) -> None:
    if codebooks.ndim != 3 or x.ndim != 2 or x.shape[1] != codebooks.shape[2]:
        raise ValueError(f"icm: x (n, d) and codebooks (m, K, d) expected, got {x.shape} and "
                         f"{codebooks.shape}")
    if codes.shape != (x.shape[0], codebooks.shape[0]) or codes.dtype.kind not in "iu":
        raise ValueError(f"icm: codes must be integers of shape {(x.shape[0], codebooks.shape[0])}"
                         f", got {codes.shape} {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= codebooks.shape[1]):
        raise ValueError(f"icm: codes out of range 0..{codebooks.shape[1] - 1}")


def _int(name: str, v, lo: int) -> None:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
        raise ValueError(f"icm: {name} must be an int >= {lo}, got {v!r}")


def _table(codebooks: np.ndarray, cross: np.ndarray | None) -> np.ndarray | None:
    """``cross`` checked, or built; None when the codebooks are past the look-up-table limit."""
    if not lut_fits(codebooks):
        return None
    if cross is None:
        return rq_cross_table(codebooks)
    m, k = codebooks.shape[0], codebooks.shape[1]
    size = k * k * m * (m - 1) // 2
    if (not isinstance(cross, np.ndarray) or cross.dtype != np.float32 or cross.shape != (size,)
            or not cross.flags.c_contiguous):
        raise ValueError(f"icm: cross must be rq_cross_table's float32 array of {size} entries "
                         f"for codebooks of shape {codebooks.shape}")
    return cross


def _run(x, codebooks, cross, codes, icm_iters, ils_iters=-1, nperts=0, book=None, code=None):
    """The C++ local search on ``codes`` (n, m) int64, in place (api.h icm_encode /
    ils_encode; ``ils_iters`` < 0: plain ICM)."""
    n, d = x.shape
    m, k = codebooks.shape[0], codebooks.shape[1]
    xs = np.ascontiguousarray(x, dtype=np.float32)
    cb = np.ascontiguousarray(codebooks, dtype=np.float32)
    ptr = (book.ctypes.data, code.ctypes.data) if book is not None else (0, 0)
    _C.icm_encode_raw(xs.ctypes.data, n, d, cb.ctypes.data, m, k, cross.ctypes.data,
                      int(icm_iters), int(ils_iters), int(nperts), *ptr, codes.ctypes.data)


def _icm_search(x: np.ndarray, codebooks: np.ndarray, codes: np.ndarray, icm_iters: int
                ) -> np.ndarray:
    """ICM by nearest-centroid searches of the residuals (codebooks past the table limit)."""
    recon = reconstruct64(codebooks, codes)
    x64 = x.astype(np.float64)
    active = np.arange(x.shape[0])
    for _ in range(icm_iters):
        if active.size == 0:
            break
        moved = np.zeros(active.size, dtype=bool)
        xa, ra = x64[active], recon[active]
        for j in range(codebooks.shape[0]):
            book = codebooks[j]
            old = codes[active, j]
            res = (xa - (ra - book[old])).astype(np.float32)
            new = assign(res, book)[0]
            ch = new != old
            if ch.any():
                ra[ch] += book[new[ch]].astype(np.float64) - book[old[ch]]
                codes[active[ch], j] = new[ch]
                moved |= ch
        recon[active] = ra
        active = active[moved]
    return codes


def icm(x: np.ndarray, codebooks: np.ndarray, codes: np.ndarray, icm_iters: int = 4,
        cross: np.ndarray | None = None) -> np.ndarray:
    """Up to ``icm_iters`` ICM sweeps (module docstring) from ``codes`` (n, m); returns new
    int64 codes (the input is not modified). ``x`` (n, d) and ``codebooks`` (m, K, d)
    float32; ``cross``: :func:`qkern.vq.search.rq_cross_table` of the codebooks (built when
    None)."""
    _check(x, codebooks, codes)
    _int("icm_iters", icm_iters, 0)
    codes = np.array(codes, dtype=np.int64, order="C")
    if icm_iters == 0 or x.shape[0] == 0:
        return codes
    cross = _table(codebooks, cross)
    if cross is None:
        return _icm_search(x, codebooks, codes, icm_iters)
    _run(x, codebooks, cross, codes, icm_iters)
    return codes


def ils(x: np.ndarray, codebooks: np.ndarray, codes: np.ndarray, ils_iters: int = 16,
        icm_iters: int = 4, nperts: int = 4, rng: np.random.Generator | None = None,
        cross: np.ndarray | None = None) -> np.ndarray:
    """Iterated local search from ``codes`` (module docstring; FAISS's LSQ defaults: 16 rounds
    when encoding, 8 in training, 4 ICM sweeps, 4 perturbations); returns int64 codes whose
    every row's squared error is <= the starting one's. ``rng``: a seeded numpy Generator
    (default ``default_rng(0)``); ``cross`` as in :func:`icm`."""
    _check(x, codebooks, codes)
    _int("ils_iters", ils_iters, 0)
    _int("icm_iters", icm_iters, 0)
    m, k = codebooks.shape[0], codebooks.shape[1]
    _int("nperts", nperts, 1)
    if nperts > m:
        raise ValueError(f"icm: nperts = {nperts} perturbed codes of {m} codebooks; need <= m")
    rng = np.random.default_rng(0) if rng is None else rng
    n = x.shape[0]
    book = np.empty((ils_iters, n, nperts), dtype=np.int32)
    code = np.empty((ils_iters, n, nperts), dtype=np.int32)
    for r in range(ils_iters):  # the draws of every round, in the order of the rounds
        book[r] = rng.integers(0, m, (n, nperts))
        code[r] = rng.integers(0, k, (n, nperts))
    start = np.array(codes, dtype=np.int64, order="C")
    if n == 0:
        return start
    cross = _table(codebooks, cross)
    if cross is not None:
        best = start.copy()
        _run(x, codebooks, cross, best, icm_iters, ils_iters, nperts, book, code)
        return best
    best = _icm_search(x, codebooks, start.copy(), icm_iters)
    err = sq_errors(x, codebooks, best)
    start_err = sq_errors(x, codebooks, start)
    worse = err > start_err  # rounding in a float32 search can (rarely) cost a hair
    best[worse], err[worse] = start[worse], start_err[worse]
    rows = np.arange(n)
    for r in range(ils_iters):
        cand = best.copy()
        for p in range(nperts):  # in order: a later draw of the same codebook wins
            cand[rows, book[r, :, p]] = code[r, :, p]
        cand = _icm_search(x, codebooks, cand, icm_iters)
        e = sq_errors(x, codebooks, cand)
        better = e < err
        best[better], err[better] = cand[better], e[better]
    return best
