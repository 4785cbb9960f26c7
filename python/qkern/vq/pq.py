"""Product quantization (Jegou et al. 2011) and k-means VQ of small blocks, both over
:class:`~qkern.vq.kmeans.KMeans`, with asymmetric-distance (ADC) search on the C++ kernels.

>>> import numpy as np
>>> x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
>>> pq = ProductQuantizer(d=16, m=4, nbits=6).train(x)
>>> codes = pq.encode(x)
>>> codes.shape, pq.code_size_bits
((2000, 4), 24)
>>> D, I = pq.search(x[:3], codes, k=5)
>>> D.shape, I.shape
((3, 5), (3, 5))
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import VQBase, as_codes, as_vectors
from .kmeans import KMeans
from .search import adc_scan, adc_table, assign, pq_encode

__all__ = ["ProductQuantizer", "VectorQuantizer", "compact_codes"]


def _check_nbits(owner: str, nbits: Any) -> None:
    if not isinstance(nbits, int) or isinstance(nbits, bool) or not 1 <= nbits <= 16:
        raise ValueError(f"{owner}: nbits must be an int in 1..16, got {nbits!r}")


def compact_codes(codes: np.ndarray, nbits: int) -> np.ndarray:
    """Checked int64 codes as the compact dtype ADC reads: uint8 for nbits <= 8, else uint16."""
    return codes.astype(np.uint8 if nbits <= 8 else np.uint16)


class ProductQuantizer(VQBase):
    """Splits d-dimensional vectors into ``m`` sub-vectors of ``d / m`` coordinates and
    quantizes each with its own k-means codebook of ``2^nbits`` entries (one KMeans per
    sub-space, ``kmeans_kw`` passed on). Codes: (n, m) int64 from ``encode`` (any integer dtype
    to ``decode`` / ``search``); ``code_size_bits = m * nbits``.

    ``search(queries, codes, k) -> (D, I)``: the k encoded vectors nearest to each query by
    asymmetric distance (the query exact, the database decoded: squared L2 to the decoded
    vector), D float32 (nq, k) ascending, I int64 (nq, k) (equal distances in index order;
    which of several equal ones at the k-th place are kept is not specified).

    >>> x = np.random.default_rng(1).standard_normal((500, 8))
    >>> pq = ProductQuantizer(8, m=2, nbits=4).train(x)
    >>> pq.decode(pq.encode(x)).shape
    (500, 8)
    """

    kind = "pq"

    def __init__(self, d: int, m: int, nbits: int = 8, n_iter: int = 25, seed: int = 0):
        super().__init__(d)
        if not isinstance(m, int) or isinstance(m, bool) or m <= 0:
            raise ValueError(f"ProductQuantizer: m must be a positive int, got {m!r}")
        if d % m:
            raise ValueError(f"ProductQuantizer: d = {d} is not divisible by m = {m} (each of "
                             f"the m sub-vectors has d / m coordinates)")
        _check_nbits("ProductQuantizer", nbits)
        self.m, self.nbits, self.n_iter, self.seed = m, nbits, n_iter, seed
        self.dsub, self.ksub = d // m, 1 << nbits
        self.codebooks: np.ndarray | None = None  # (m, ksub, dsub) float32

    def _train(self, x: np.ndarray, **kw) -> None:
        if x.shape[0] < self.ksub:
            raise ValueError(f"ProductQuantizer: {x.shape[0]} training vectors for 2^nbits = "
                             f"{self.ksub} centroids per sub-space; need >= {self.ksub}")
        books = []
        for j in range(self.m):
            km = KMeans(self.dsub, self.ksub, n_iter=self.n_iter, seed=self.seed + j)
            books.append(km.train(self._sub(x, j), **kw).centroids)
        self.codebooks = np.ascontiguousarray(np.stack(books))

    def _sub(self, x: np.ndarray, j: int) -> np.ndarray:
        return np.ascontiguousarray(x[:, j * self.dsub:(j + 1) * self.dsub])

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return pq_encode(x, self.codebooks)  # all m sub-spaces in one C++ call

    def _decode(self, codes: Any) -> np.ndarray:
        c = as_codes(codes, self.m, self.ksub)
        out = self.codebooks[np.arange(self.m)[None, :], c]  # (n, m, dsub)
        return np.ascontiguousarray(out.reshape(c.shape[0], self.d))

    def search(self, queries: Any, codes: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest encoded vectors of each query by ADC (see the class docstring)."""
        self._require_trained("search")
        q = as_vectors(queries, self.d, "queries")
        c = compact_codes(as_codes(codes, self.m, self.ksub), self.nbits)
        n = c.shape[0]
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
            raise ValueError(f"ProductQuantizer.search: k must be an int in 1..{n} (the number "
                             f"of codes), got {k!r}")
        dist = adc_scan(adc_table(q, self.codebooks), c)
        part = np.argpartition(dist, k - 1, axis=1)[:, :k] if k < n else \
            np.broadcast_to(np.arange(n), dist.shape)
        dk = np.take_along_axis(dist, part, axis=1)
        order = np.lexsort((part, dk), axis=1)  # by distance, then by index
        idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
        return np.take_along_axis(dist, idx, axis=1), idx

    @property
    def code_size_bits(self) -> int:
        return self.m * self.nbits

    def config(self) -> dict:
        return {"d": self.d, "m": self.m, "nbits": self.nbits, "n_iter": self.n_iter,
                "seed": self.seed}

    def state(self) -> dict[str, torch.Tensor]:
        return {} if self.codebooks is None else {"codebooks": torch.from_numpy(self.codebooks)}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.codebooks = _one_tensor(tensors, "codebooks", (self.m, self.ksub, self.dsub),
                                     "ProductQuantizer")


class VectorQuantizer(VQBase):
    """k-means VQ of d-dimensional vectors in blocks of ``dim`` (2, 4 or 8) coordinates that
    share one codebook of ``2^nbits`` entries: (n, d) is reshaped to (n * d / dim, dim) and
    quantized by one KMeans. Codes: (n, d / dim) int64; ``code_size_bits = d / dim * nbits``.

    >>> x = np.random.default_rng(2).standard_normal((300, 8))
    >>> vq = VectorQuantizer(8, dim=2, nbits=4).train(x)
    >>> vq.encode(x).shape, vq.code_size_bits
    ((300, 4), 16)
    """

    kind = "vq"

    def __init__(self, d: int, dim: int = 2, nbits: int = 8, n_iter: int = 25, seed: int = 0):
        super().__init__(d)
        if dim not in (2, 4, 8) or isinstance(dim, bool):
            raise ValueError(f"VectorQuantizer: dim must be 2, 4 or 8, got {dim!r}")
        if d % dim:
            raise ValueError(f"VectorQuantizer: d = {d} is not divisible by dim = {dim}")
        _check_nbits("VectorQuantizer", nbits)
        self.dim, self.nbits, self.n_iter, self.seed = dim, nbits, n_iter, seed
        self.blocks, self.ksub = d // dim, 1 << nbits
        self.codebook: np.ndarray | None = None  # (ksub, dim) float32

    def _train(self, x: np.ndarray, **kw) -> None:
        flat = x.reshape(-1, self.dim)
        if flat.shape[0] < self.ksub:
            raise ValueError(f"VectorQuantizer: {flat.shape[0]} training blocks of {self.dim} "
                             f"for 2^nbits = {self.ksub} centroids; need >= {self.ksub}")
        if "weights" in kw and kw["weights"] is not None:  # one weight per vector -> per block
            kw["weights"] = np.repeat(np.asarray(kw["weights"], dtype=np.float64), self.blocks)
        km = KMeans(self.dim, self.ksub, n_iter=self.n_iter, seed=self.seed)
        self.codebook = km.train(flat, **kw).centroids

    def _encode(self, x: np.ndarray) -> np.ndarray:
        codes = assign(x.reshape(-1, self.dim), self.codebook)[0]
        return codes.reshape(x.shape[0], self.blocks)

    def _decode(self, codes: Any) -> np.ndarray:
        c = as_codes(codes, self.blocks, self.ksub)
        return np.ascontiguousarray(self.codebook[c].reshape(c.shape[0], self.d))

    @property
    def code_size_bits(self) -> int:
        return self.blocks * self.nbits

    def config(self) -> dict:
        return {"d": self.d, "dim": self.dim, "nbits": self.nbits, "n_iter": self.n_iter,
                "seed": self.seed}

    def state(self) -> dict[str, torch.Tensor]:
        return {} if self.codebook is None else {"codebook": torch.from_numpy(self.codebook)}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.codebook = _one_tensor(tensors, "codebook", (self.ksub, self.dim), "VectorQuantizer")


def _one_tensor(tensors: dict[str, torch.Tensor], name: str, shape: tuple, owner: str):
    if set(tensors) != {name}:
        raise ValueError(f"{owner}: expected the tensor {name!r}, got {sorted(tensors)}")
    t = tensors[name].to(torch.float32).numpy()
    if t.shape != shape:
        raise ValueError(f"{owner}: {name} of shape {tuple(t.shape)}, expected {shape}")
    return np.ascontiguousarray(t)
