"""Nearest-centroid search and product-quantization ADC on the C++ kernels
(csrc/cpu/vq/api.h), over numpy arrays:

- ``assign(x, centroids) -> (codes, dist)``: for each row of ``x`` (n, d) the index of the
  nearest row of ``centroids`` (k, d) in squared L2 (ties: the lowest index) and that squared
  distance, computed as ``||x||^2 + (||c||^2 - 2 x.c)`` in float32 (FAISS's expansion), clamped
  at >= 0. Its error is a few ulp of ``||x||^2 + ||c||^2``, not of the distance.
- ``assign_grouped(x, centroids, rows) -> (codes, dist)``: ``assign`` with one codebook per
  group of ``rows`` consecutive rows of ``x`` (centroids (groups, k, d)): row ``i`` searches
  ``centroids[i // rows]`` (the same kernel, called once per group).
- ``topk(x, centroids, k) -> (idx, dist)``: the ``k`` nearest centroids of each row, (n, k)
  each, ascending by the same float32 values (ties: the lower index first); column 0 is
  ``assign``'s result.
- ``smallest(values, k) -> idx``: the positions of the ``k`` smallest entries of each row of
  ``values`` (n, len), ascending (equal values: the lower position first).
- ``pq_encode(x, codebooks) -> codes``: product-quantization codes (n, m) int64 of ``x``
  (n, m * dsub) against ``codebooks`` (m, ksub, dsub): column j is ``assign``'s code of the j-th
  sub-vector among ``codebooks[j]`` (the same values and ties), all m in one C++ call.
- ``adc_table(q, codebooks) -> table``: ``table[i, j, c] = ||q_i[j] - codebooks[j, c]||^2``, the
  squared distance of the j-th sub-vector of each query (nq, m * dsub) to every sub-centroid of
  ``codebooks`` (m, ksub, dsub).
- ``adc_scan(table, codes) -> dist``: ``dist[i, n] = sum_j table[i, j, codes[n, j]]`` for codes
  (n, m) of dtype uint8 or uint16: the asymmetric distance of each query to each encoded vector.
- ``rq_cross_table(codebooks) -> cross`` and ``rq_beam_encode(x, codebooks, beam, cross) ->
  codes``: a residual quantizer's beam search over codebooks (m, K, d) from look-up tables
  (FAISS's ``use_beam_LUT``): the dot products of each row with every codeword and the
  codewords' cross products ``cross`` (for stage s, ``books[j][a] . books[s][c]`` for j < s;
  K^2 m (m - 1) / 2 floats, built once per codebooks) give each candidate's squared residual
  norm without forming residuals (csrc/cpu/vq/api.h has the float order and ties).

Every ISA (scalar, AVX2, AVX-512) gives the same bits; so does every thread count.

>>> import numpy as np
>>> codes, dist = assign(np.array([[0.0, 0.1], [2.0, 2.0]]), np.array([[0.0, 0.0], [2.0, 2.1]]))
>>> codes.tolist(), [round(float(v), 4) for v in dist]
([0, 1], [0.01, 0.01])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import _C
from .base import as_vectors

__all__ = ["assign", "assign_grouped", "topk", "smallest", "pq_encode", "adc_table",
           "adc_scan", "rq_cross_table", "rq_beam_encode", "lut_fits", "LUT_MAX_FLOATS"]

#: the largest codeword cross-product table (floats, K^2 m (m - 1) / 2) the look-up-table
#: encoders (the RQ beam search, ICM / ILS) build: 2^25 floats (128 MiB), enough for 32 stages
#: of 256 (32.5M floats, 124 MiB); larger codebooks search by residuals. User-settable (read at
#: each encode): ``qkern.vq.search.LUT_MAX_FLOATS = 1 << 24`` caps the table at 64 MiB.
LUT_MAX_FLOATS = 1 << 25


def lut_fits(codebooks: np.ndarray) -> bool:
    """Whether :func:`rq_cross_table` of ``codebooks`` (m, K, d) holds at most
    ``LUT_MAX_FLOATS`` floats."""
    m, k = codebooks.shape[0], codebooks.shape[1]
    return k * k * m * (m - 1) // 2 <= LUT_MAX_FLOATS


def _floats(a: Any, name: str, ndim: int) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to("cpu", torch.float32).numpy()
    a = np.asarray(a)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a float array, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return a


def assign(x: Any, centroids: Any) -> tuple[np.ndarray, np.ndarray]:
    """The nearest centroid of each row of ``x`` (n, d): ``(codes int64 (n,), dist float32
    (n,))``, dist the squared L2 distance (see the module docstring)."""
    c = _floats(centroids, "centroids", 2)
    x = as_vectors(x, c.shape[1], "x")
    n, d = x.shape
    codes = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float32)
    _C.vq_assign_raw(x.ctypes.data, n, d, c.ctypes.data, c.shape[0], codes.ctypes.data, True,
                     dist.ctypes.data)
    return codes, dist


def assign_grouped(x: Any, centroids: Any, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`assign` of row ``i`` of ``x`` (n, d) among ``centroids[i // rows]``, centroids
    (groups, k, d) with ``groups = ceil(n / rows)``: ``(codes int64 (n,), dist float32 (n,))``.

    >>> cb = np.array([[[0.0], [1.0]], [[5.0], [9.0]]])
    >>> assign_grouped(np.array([[0.9], [0.1], [8.0]]), cb, 2)[0].tolist()
    [1, 0, 1]
    """
    c = _floats(centroids, "centroids", 3)
    groups, k, d = c.shape
    x = as_vectors(x, d, "x")
    n = x.shape[0]
    if not isinstance(rows, (int, np.integer)) or isinstance(rows, bool) or rows < 1:
        raise ValueError(f"assign_grouped: rows must be an int >= 1, got {rows!r}")
    if groups != -(-n // int(rows)):
        raise ValueError(f"assign_grouped: {groups} codebooks for {n} rows in groups of "
                         f"{rows}; expected {-(-n // int(rows))}")
    rows = int(rows)
    codes = np.empty(n, dtype=np.int64)
    dist = np.empty(n, dtype=np.float32)
    xp, cp, op, dp = x.ctypes.data, c.ctypes.data, codes.ctypes.data, dist.ctypes.data
    for g in range(groups):
        r0 = g * rows
        m = min(rows, n - r0)
        _C.vq_assign_raw(xp + 4 * r0 * d, m, d, cp + 4 * g * k * d, k, op + 8 * r0, True,
                         dp + 4 * r0)
    return codes, dist


def topk(x: Any, centroids: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest centroids of each row of ``x`` (n, d): ``(idx int64 (n, k), dist
    float32 (n, k))``, ascending by distance, equal ones by index (see the module docstring).

    >>> idx, dist = topk(np.array([[0.0, 0.0]]), np.array([[3.0, 0], [1.0, 0], [2.0, 0]]), 2)
    >>> idx.tolist(), dist.tolist()
    ([[1, 2]], [[1.0, 4.0]])
    """
    c = _floats(centroids, "centroids", 2)
    x = as_vectors(x, c.shape[1], "x")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= c.shape[0]:
        raise ValueError(f"topk: k must be an int in 1..{c.shape[0]} (the number of "
                         f"centroids), got {k!r}")
    k = int(k)
    n, d = x.shape
    idx = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float32)
    _C.vq_topk_raw(x.ctypes.data, n, d, c.ctypes.data, c.shape[0], k, idx.ctypes.data,
                   dist.ctypes.data)
    return idx, dist


def smallest(values: Any, k: int) -> np.ndarray:
    """The positions (n, k) int64 of the ``k`` smallest entries of each row of ``values``
    (n, len) float32, ascending by value, equal values by position (a stable partial argsort).

    >>> smallest(np.array([[3.0, 1.0, 2.0, 1.0]]), 3).tolist()
    [[1, 3, 2]]
    """
    v = _floats(values, "values", 2)
    n, length = v.shape
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= length:
        raise ValueError(f"smallest: k must be an int in 1..{length} (the row length), "
                         f"got {k!r}")
    idx = np.empty((n, int(k)), dtype=np.int64)
    _C.vq_topk_rows_raw(v.ctypes.data, n, length, int(k), idx.ctypes.data)
    return idx


def pq_encode(x: Any, codebooks: Any) -> np.ndarray:
    """PQ codes (n, m) int64 of ``x`` (n, m * dsub) against ``codebooks`` (m, ksub, dsub): the
    nearest sub-centroid of each sub-vector, as :func:`assign` gives it (module docstring).

    >>> books = np.array([[[0.0], [1.0]], [[0.0], [5.0]]])  # m = 2, ksub = 2, dsub = 1
    >>> pq_encode(np.array([[0.9, 0.2], [0.1, 4.0]]), books).tolist()
    [[1, 0], [0, 1]]
    """
    cb = _floats(codebooks, "codebooks", 3)
    m, ksub, dsub = cb.shape
    x = as_vectors(x, m * dsub, "x")
    codes = np.empty((x.shape[0], m), dtype=np.int64)
    _C.pq_encode_raw(x.ctypes.data, x.shape[0], m, ksub, dsub, cb.ctypes.data, codes.ctypes.data)
    return codes


def adc_table(q: Any, codebooks: Any) -> np.ndarray:
    """ADC look-up tables (nq, m, ksub) float32 of queries ``q`` (nq, m * dsub) against
    ``codebooks`` (m, ksub, dsub)."""
    cb = _floats(codebooks, "codebooks", 3)
    m, ksub, dsub = cb.shape
    q = as_vectors(q, m * dsub, "q")
    table = np.empty((q.shape[0], m, ksub), dtype=np.float32)
    _C.pq_adc_table_raw(q.ctypes.data, q.shape[0], m, ksub, dsub, cb.ctypes.data,
                        table.ctypes.data)
    return table


def adc_scan(table: Any, codes: Any) -> np.ndarray:
    """Asymmetric distances (nq, n) float32: ``sum_j table[q, j, codes[i, j]]`` for ``table``
    (nq, m, ksub) from :func:`adc_table` and ``codes`` (n, m) uint8 or uint16, each < ksub."""
    t = _floats(table, "table", 3)
    nq, m, ksub = t.shape
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    c = np.asarray(codes)
    if c.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"codes must be uint8 or uint16, got dtype {c.dtype}")
    if c.ndim != 2 or c.shape[1] != m:
        raise ValueError(f"codes must have shape (n, {m}) (m = table.shape[1]), got {c.shape}")
    c = np.ascontiguousarray(c)
    if c.size and ksub < 256 ** c.itemsize and int(c.max()) >= ksub:
        col = int(np.nonzero((c >= ksub).any(axis=0))[0][0])
        raise ValueError(f"codes out of range: column {col} has {int(c[:, col].max())}, the "
                         f"table has ksub = {ksub} entries")
    dist = np.empty((nq, c.shape[0]), dtype=np.float32)
    if c.shape[0]:
        _C.pq_adc_scan_raw(t.ctypes.data, nq, ksub, c.ctypes.data, c.shape[0], m, c.itemsize,
                           dist.ctypes.data)
    return dist


def rq_cross_table(codebooks: Any) -> np.ndarray:
    """The cross products of residual codebooks (m, K, d): float32 of K^2 m (m - 1) / 2, stage
    s's block (s K, K) at offset K^2 s (s - 1) / 2, row j K + a, column c = books[j][a] .
    books[s][c] (j < s).

    >>> cb = np.array([[[1.0, 0.0]], [[2.0, 3.0]], [[0.0, 1.0]]])  # m = 3, K = 1, d = 2
    >>> rq_cross_table(cb).tolist()   # 1.2; 1.0, 2.0 (stage 2: 0.1 + 0.0, 2.0 + 3.1)
    [2.0, 0.0, 3.0]
    """
    cb = _floats(codebooks, "codebooks", 3)
    m, k, d = cb.shape
    cross = np.empty(k * k * m * (m - 1) // 2, dtype=np.float32)
    if m > 1:
        _C.rq_cross_table_raw(cb.ctypes.data, m, k, d, cross.ctypes.data)
    return cross


def rq_beam_encode(x: Any, codebooks: Any, beam: int, cross: np.ndarray | None = None
                   ) -> np.ndarray:
    """Residual codes (n, m) int64 of ``x`` (n, d) against ``codebooks`` (m, K, d) by a beam
    search of width ``beam`` from look-up tables; ``cross``: :func:`rq_cross_table` of the
    codebooks (built here when None).

    >>> cb = np.array([[[0.0, 0.0], [4.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    >>> rq_beam_encode(np.array([[4.0, 1.1], [0.1, 0.0]]), cb, 2).tolist()
    [[1, 1], [0, 0]]
    """
    cb = _floats(codebooks, "codebooks", 3)
    m, k, d = cb.shape
    x = as_vectors(x, d, "x")
    if not isinstance(beam, (int, np.integer)) or isinstance(beam, bool) or beam < 1:
        raise ValueError(f"rq_beam_encode: beam must be an int >= 1, got {beam!r}")
    if cross is None:
        cross = rq_cross_table(cb)
    size = k * k * m * (m - 1) // 2
    if (not isinstance(cross, np.ndarray) or cross.dtype != np.float32 or cross.shape != (size,)
            or not cross.flags.c_contiguous):
        raise ValueError(f"rq_beam_encode: cross must be rq_cross_table's float32 array of "
                         f"{size} entries for codebooks of shape {cb.shape}")
    codes = np.empty((x.shape[0], m), dtype=np.int64)
    _C.rq_beam_encode_raw(x.ctypes.data, x.shape[0], d, cb.ctypes.data, m, k,
                          cross.ctypes.data, int(beam), codes.ctypes.data)
    return codes
