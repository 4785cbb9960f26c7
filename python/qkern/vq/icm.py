"""Encoding for additive codebooks by local search (LSQ, Martinez et al. 2016 / 2018, as FAISS's
``LocalSearchQuantizer`` does it): iterated conditional modes (ICM) inside an iterated local
search (ILS).

A code (n, m) of ``codebooks`` (m, K, d) reconstructs ``x`` as ``sum_j codebooks[j, b_j]``.

- :func:`icm`: ``icm_iters`` sweeps; in a sweep each codebook j in turn (0..m-1) takes, for
  each vector, the entry nearest to the residual ``x - sum_{i != j} codebooks[i, b_i]`` with
  the other codes fixed: one nearest-centroid search per codebook
  (:func:`qkern.vq.search.assign`, C++). A sweep stops a vector's search early once it is a
  fixed point (no code changed in its previous sweep: every choice is then already the best
  given the others, so another sweep would change nothing), and the whole loop stops when no
  vector moves.
- :func:`ils`: ``ils_iters`` rounds of (perturb ``nperts`` codes of each vector's best code so
  far: a random codebook, a random entry, drawn from the seeded generator ``rng``; then ICM);
  a vector keeps the new code only where it lowers its squared error (float64). The result is
  never worse than the starting codes.

The residuals are formed from a float64 running sum of the chosen entries and rounded to
float32 for the search; everything is a fixed sequence of numpy / C++ operations of
thread-independent results, so a given ``rng`` state gives the same codes on every run and
thread count.

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

from .search import assign

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


def icm(x: np.ndarray, codebooks: np.ndarray, codes: np.ndarray, icm_iters: int = 4
        ) -> np.ndarray:
    """Up to ``icm_iters`` ICM sweeps (module docstring) from ``codes`` (n, m); returns new
    int64 codes (the input is not modified). ``x`` (n, d) and ``codebooks`` (m, K, d)
    float32."""
    _check(x, codebooks, codes)
    _int("icm_iters", icm_iters, 0)
    codes = codes.astype(np.int64, copy=True)
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


def ils(x: np.ndarray, codebooks: np.ndarray, codes: np.ndarray, ils_iters: int = 16,
        icm_iters: int = 4, nperts: int = 4, rng: np.random.Generator | None = None
        ) -> np.ndarray:
    """Iterated local search from ``codes`` (module docstring; FAISS's LSQ defaults: 16 rounds
    when encoding, 8 in training, 4 ICM sweeps, 4 perturbations); returns int64 codes whose
    every row's squared error is <= the starting one's. ``rng``: a seeded numpy Generator
    (default ``default_rng(0)``)."""
    _check(x, codebooks, codes)
    _int("ils_iters", ils_iters, 0)
    m, k = codebooks.shape[0], codebooks.shape[1]
    _int("nperts", nperts, 1)
    if nperts > m:
        raise ValueError(f"icm: nperts = {nperts} perturbed codes of {m} codebooks; need <= m")
    rng = np.random.default_rng(0) if rng is None else rng
    n = x.shape[0]
    best = icm(x, codebooks, codes, icm_iters)
    err = sq_errors(x, codebooks, best)
    start_err = sq_errors(x, codebooks, codes)
    worse = err > start_err  # rounding in a float32 search can (rarely) cost a hair
    best[worse], err[worse] = codes[worse], start_err[worse]
    rows = np.arange(n)
    for _ in range(ils_iters):
        cand = best.copy()
        which = rng.integers(0, m, (n, nperts))
        value = rng.integers(0, k, (n, nperts))
        for p in range(nperts):  # in order: a later draw of the same codebook wins
            cand[rows, which[:, p]] = value[:, p]
        cand = icm(x, codebooks, cand, icm_iters)
        e = sq_errors(x, codebooks, cand)
        better = e < err
        best[better], err[better] = cand[better], e[better]
    return best
