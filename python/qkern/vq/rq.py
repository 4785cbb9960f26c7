"""Residual and additive quantizers (FAISS's ``ResidualQuantizer`` / LSQ-refined additive
codebooks) and a two-level quantizer (a coarse k-means, then a PQ or RQ of the residuals).

A residual / additive code of ``m`` stages of ``nbits`` each reconstructs a vector as the sum of
one entry of each of the ``m`` codebooks (m, 2^nbits, d). Encoding is a beam search (FAISS's):
stage s keeps, per vector, the ``beam_size`` partial encodings with the smallest residual
after s + 1 stages. ``encode`` runs it from look-up tables (:func:`qkern.vq.search.rq_beam_encode`,
FAISS's ``use_beam_LUT``: each vector's dot products with every codeword and the codewords'
cross products, built once per codebooks and cached, give the candidates' residual norms
without forming residuals) while the cross-product table holds at most ``search.LUT_MAX_FLOATS``
floats (m = 16 stages of 256); otherwise, and in training (whose k-means needs the residuals),
each stage forms the residuals: each entry's nearest codewords from the C++ top-k kernel
(:func:`qkern.vq.search.topk`), the best of a vector's candidates from
:func:`qkern.vq.search.smallest` (C++ too). Both keep ties the same way (the earlier parent,
then the lower codeword); their float sums differ, so a near-tie may rarely go either way.
``beam_size = 1`` is the greedy encoding; a beam of ``2^(nbits m)`` is exhaustive.

>>> import numpy as np
>>> x = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
>>> rq = ResidualQuantizer(d=8, m=3, nbits=4, beam_size=4).train(x)
>>> codes = rq.encode(x)
>>> codes.shape, rq.code_size_bits
((1000, 3), 12)
>>> bool(rq.mse(x) < ((x - x.mean(0)) ** 2).sum(1).mean())
True
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import VQBase, as_codes
from .icm import ils, sq_errors
from .kmeans import KMeans, progressive_dim_kmeans
from .pq import ProductQuantizer
from .search import assign, lut_fits, rq_beam_encode, rq_cross_table, smallest, topk

__all__ = ["ResidualQuantizer", "AdditiveQuantizer", "MultiLevelVQ", "beam_search"]

def _int(owner: str, name: str, v: Any, lo: int, hi: int | None = None) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{owner}: {name} must be an int {rng}, got {v!r}")


def _beam_step(res: np.ndarray, codes: np.ndarray, book: np.ndarray, beam: int):
    """One stage of the beam search: ``res`` (n, B, d) residuals of the B partial codes
    ``codes`` (n, B, s) of each vector; returns the new (n, B', d) residuals, (n, B', s + 1)
    codes and (n, B') squared residual norms, B' = min(beam, B * K), best first (equal
    distances: the earlier parent, then the lower codeword)."""
    n, b, d = res.shape
    s = codes.shape[2]
    kk = min(beam, book.shape[0])
    idx, dist = topk(res.reshape(n * b, d), book, kk)
    idx, dist = idx.reshape(n, b * kk), dist.reshape(n, b * kk)
    nb = min(beam, b * kk)
    sel = smallest(dist, nb)
    cid = np.take_along_axis(idx, sel, axis=1).ravel()
    # the parents' rows of the flattened (n * b, ...) arrays: whole-row gathers (np.take)
    rows = (sel // kk + (np.arange(n, dtype=np.int64) * b)[:, None]).ravel()
    new_codes = np.empty((n * nb, s + 1), dtype=np.int64)
    np.take(codes.reshape(n * b, s), rows, axis=0, out=new_codes[:, :s])
    new_codes[:, s] = cid
    new_res = np.take(res.reshape(n * b, d), rows, axis=0)
    new_res -= np.take(book, cid, axis=0)
    return (new_res.reshape(n, nb, d), new_codes.reshape(n, nb, s + 1),
            np.take_along_axis(dist, sel, axis=1))


def beam_search(x: np.ndarray, codebooks: np.ndarray, beam_size: int,
                cross: np.ndarray | None = None, lut: bool | None = None) -> np.ndarray:
    """Residual codes (n, m) int64 of ``x`` (n, d) float32 against ``codebooks`` (m, K, d) by
    a beam search of width ``beam_size`` (module docstring): the best final entry. ``lut``:
    from look-up tables (``cross``: :func:`qkern.vq.search.rq_cross_table` of the codebooks,
    built when None) or by residuals; None: tables when they fit ``search.LUT_MAX_FLOATS``."""
    if lut is None:
        lut = lut_fits(codebooks)
    if lut:
        return rq_beam_encode(x, codebooks, beam_size, cross)
    n, d = x.shape
    res, codes = x[:, None, :], np.zeros((n, 1, 0), dtype=np.int64)
    for book in codebooks:
        res, codes, _ = _beam_step(res, codes, book, beam_size)
    return np.ascontiguousarray(codes[:, 0, :])


def _check_books(owner: str, tensors: dict[str, torch.Tensor], shape: tuple) -> np.ndarray:
    if set(tensors) != {"codebooks"}:
        raise ValueError(f"{owner}: expected the tensor 'codebooks', got {sorted(tensors)}")
    t = tensors["codebooks"].to(torch.float32).numpy()
    if t.shape != shape:
        raise ValueError(f"{owner}: codebooks of shape {tuple(t.shape)}, expected {shape}")
    return np.ascontiguousarray(t)


class ResidualQuantizer(VQBase):
    """Residual quantizer of ``m`` stages of ``2^nbits`` codewords (FAISS's
    ``ResidualQuantizer(d, m, nbits)`` with ``max_beam_size = beam_size``): stage s is a
    k-means (``n_iter`` Lloyd iterations, seed ``seed + s``) of the residuals of every beam
    entry after stages 0..s-1, the training vectors then re-encoded by one beam step. With
    ``progressive_dim_steps = p > 0`` each stage's k-means is FAISS's progressive-dimension
    one instead (:func:`qkern.vq.kmeans.progressive_dim_kmeans`, p steps of ``n_iter``
    iterations each; FAISS's default: p = 10, n_iter = 10), which fits the training set less
    closely (better on held-out vectors when the codebooks are large next to the data). Codes
    (n, m) int64; ``decode`` sums the chosen codewords; ``code_size_bits = m * nbits``.
    ``encode_beam_size`` (default: ``beam_size``) widens or narrows the beam of ``encode``
    alone: training keeps ``beam_size`` (a wider encode beam finds better codes for the same
    codebooks, at a cost linear in the width; the bench trains at FAISS's 5 and encodes at 12).

    >>> x = np.random.default_rng(1).standard_normal((600, 6))
    >>> rq = ResidualQuantizer(6, m=2, nbits=5).train(x)
    >>> rq.decode(rq.encode(x[:2])).shape
    (2, 6)
    """

    kind = "rq"

    def __init__(self, d: int, m: int, nbits: int = 8, beam_size: int = 1, n_iter: int = 25,
                 seed: int = 0, progressive_dim_steps: int = 0,
                 encode_beam_size: int | None = None):
        super().__init__(d)
        owner = type(self).__name__
        if encode_beam_size is not None:
            _int(owner, "encode_beam_size", encode_beam_size, 1)
        self.encode_beam_size = encode_beam_size
        _int(owner, "progressive_dim_steps", progressive_dim_steps, 0)
        self.progressive_dim_steps = progressive_dim_steps
        _int(owner, "m", m, 1)
        _int(owner, "nbits", nbits, 1, 16)
        _int(owner, "beam_size", beam_size, 1)
        _int(owner, "n_iter", n_iter, 0)
        _int(owner, "seed", seed, 0)
        self.m, self.nbits, self.beam_size = m, nbits, beam_size
        self.n_iter, self.seed, self.ksub = n_iter, seed, 1 << nbits
        self.codebooks: np.ndarray | None = None  # (m, ksub, d) float32
        self._cross: tuple[np.ndarray, np.ndarray] | None = None  # (codebooks, their table)

    def _tables(self, books: np.ndarray) -> np.ndarray | None:
        """The cached cross-product table of ``books`` (the codebooks array it was built from,
        by identity: assign new codebooks, do not modify them in place), None when too big."""
        if not lut_fits(books):
            return None
        if self._cross is None or self._cross[0] is not books:
            self._cross = (books, rq_cross_table(books))
        return self._cross[1]

    def _beam(self, x: np.ndarray, books: np.ndarray, beam: int | None = None) -> np.ndarray:
        return beam_search(x, books, beam or self.beam_size, self._tables(books))

    def _train(self, x: np.ndarray, **kw) -> None:
        if kw:
            raise TypeError(f"{type(self).__name__}.train: unexpected arguments {sorted(kw)}")
        if x.shape[0] < self.ksub:
            raise ValueError(f"{type(self).__name__}: {x.shape[0]} training vectors for "
                             f"2^nbits = {self.ksub} codewords per stage; need >= {self.ksub}")
        n, d = x.shape
        res, codes = x[:, None, :], np.zeros((n, 1, 0), dtype=np.int64)
        books = []
        for s in range(self.m):
            xs = np.ascontiguousarray(res.reshape(-1, d))
            if self.progressive_dim_steps:
                book = progressive_dim_kmeans(xs, self.ksub, self.progressive_dim_steps,
                                              self.n_iter, self.seed + s)
            else:
                book = KMeans(d, self.ksub, n_iter=self.n_iter, seed=self.seed + s).train(
                    xs).centroids
            books.append(book)
            res, codes, _ = _beam_step(res, codes, book, self.beam_size)
        self.codebooks = np.ascontiguousarray(np.stack(books))

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return self._beam(x, self.codebooks, self.encode_beam_size)

    def _decode(self, codes: Any) -> np.ndarray:
        c = as_codes(codes, self.m, self.ksub)
        out = np.zeros((c.shape[0], self.d), dtype=np.float32)
        for s in range(self.m):  # the sum in stage order, float32 (as the encoder's residuals)
            out += self.codebooks[s][c[:, s]]
        return out

    @property
    def code_size_bits(self) -> int:
        return self.m * self.nbits

    def config(self) -> dict:
        out = {"d": self.d, "m": self.m, "nbits": self.nbits, "beam_size": self.beam_size,
               "n_iter": self.n_iter, "seed": self.seed,
               "progressive_dim_steps": self.progressive_dim_steps}
        if self.encode_beam_size is not None:
            out["encode_beam_size"] = self.encode_beam_size
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {} if self.codebooks is None else {"codebooks": torch.from_numpy(self.codebooks)}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.codebooks = _check_books(type(self).__name__, tensors,
                                      (self.m, self.ksub, self.d))


def lsq_codebooks(x: np.ndarray, codes: np.ndarray, codebooks: np.ndarray,
                  ridge: float = 1e-3) -> np.ndarray:
    """The joint least-squares update of all ``m`` codebooks (m, K, d) for fixed ``codes``
    (n, m) (LSQ, Martinez et al. 2016): C = argmin ||x - B C||^2 + lam ||C - C_old||^2 over the
    stacked codebooks C (m K, d), B the (n, m K) one-hot code matrix, lam = ``ridge`` x the
    mean codeword count (it keeps unused codewords and the m - 1 shared offsets in place).
    Solved in float64 through the normal equations (B^T B counted, not formed)."""
    n, m = codes.shape
    k, d = codebooks.shape[1], codebooks.shape[2]
    mk = m * k
    flat = codes + np.arange(m, dtype=np.int64)[None, :] * k  # (n, m) rows of B's ones
    pairs = (flat[:, :, None] * mk + flat[:, None, :]).ravel()
    btb = np.bincount(pairs, minlength=mk * mk).astype(np.float64).reshape(mk, mk)
    btx = torch.zeros((mk, d), dtype=torch.float64).index_add_(
        0, torch.from_numpy(flat.ravel()),
        torch.from_numpy(np.repeat(x.astype(np.float64), m, axis=0))).numpy()
    lam = ridge * n / k
    old = codebooks.reshape(mk, d).astype(np.float64)
    new = np.linalg.solve(btb + lam * np.eye(mk), btx + lam * old)
    return np.ascontiguousarray(new.reshape(m, k, d).astype(np.float32))


class AdditiveQuantizer(ResidualQuantizer):
    """Additive quantizer with the code shape of :class:`ResidualQuantizer` (m codebooks of
    2^nbits entries, codes (n, m), decode = the sum), trained from the RQ's codebooks.

    ``encoder="ils"`` (default; FAISS's ``LocalSearchQuantizer``): codes by iterated local
    search (:func:`qkern.vq.icm.ils`: ICM sweeps under random perturbations of ``nperts``
    codes, ``ils_iters`` rounds, ``icm_iters`` sweeps each) started from the beam search's
    codes, the perturbations drawn from ``default_rng([seed, 1])`` at each ``encode`` call (so
    the same input gives the same codes; a row's code may depend on its position in the
    batch). Training, from the RQ's codebooks: ``refine_rounds`` rounds of (the joint
    least-squares update of all codebooks for the current codes, :func:`lsq_codebooks`; the
    training set re-encoded from scratch by the encoder, with ``train_ils_iters`` ILS rounds),
    the codebooks with the lowest training error of the encoder's codes kept. The codes are
    never carried over from round to round (FAISS's LSQ does that, from random codes, and
    reaches training errors its encoder does not reach again on vectors it was not trained on
    in that order). ``anneal > 0`` adds LSQ's SR-D annealing: the codes of the next round come
    from codebooks moved by Gaussian noise of standard deviation ``T * std(x) / m`` per
    coordinate, ``T = anneal * (1 - (i + 1) / refine_rounds) ** 0.5`` (FAISS: 1; off by
    default: from the RQ's start it did not help on digits).

    ``encoder="beam"``: the earlier recipe, codes by the beam search, rounds of (least-squares
    update, beam re-encoding) while the training MSE drops.

    ``init="random"`` trains as FAISS's LSQ does instead (no RQ): random codes, then rounds of
    (ILS from the codes so far, the least-squares update shrunk toward zero). With many
    codewords per training vector the RQ start memorizes the training set (minilm, 32 x 256
    codewords, 2000 vectors: RQ training MSE 0.002, held-out 0.366) and the random start
    generalizes better there (docs/vq.md). Which start is better depends on the data and the
    code size: ``init="auto"`` measures it, training both starts on 90 % of the training set
    and scoring them on the rest (``start_scores``), then training the better one on all of it
    (about three trainings' time).

    Either way, if the trained codebooks encode the training set worse than the RQ did, the
    RQ's codebooks are kept: never worse than the RQ on the training data (``rq_mse`` and
    ``mse_history`` record the path).

    >>> x = np.random.default_rng(2).standard_normal((800, 8)).astype(np.float32)
    >>> aq = AdditiveQuantizer(8, m=3, nbits=4, beam_size=2, refine_rounds=3).train(x)
    >>> bool(aq.mse(x) <= aq.rq_mse)
    True
    """

    kind = "aq"

    def __init__(self, d: int, m: int, nbits: int = 8, beam_size: int = 1, n_iter: int = 25,
                 seed: int = 0, refine_rounds: int = 4, ridge: float = 1e-3,
                 progressive_dim_steps: int = 0, encoder: str = "ils", ils_iters: int = 16,
                 train_ils_iters: int = 8, icm_iters: int = 4, nperts: int | None = None,
                 anneal: float = 0.0, init: str = "rq"):
        super().__init__(d, m, nbits, beam_size, n_iter, seed, progressive_dim_steps)
        owner = "AdditiveQuantizer"
        if init not in ("rq", "random", "auto") or (init != "rq" and encoder != "ils"):
            raise ValueError(f"{owner}: init must be 'rq', 'random' or 'auto' (the last two "
                             f"with encoder='ils'), got init={init!r}, encoder={encoder!r}")
        self.init = init
        self.start_scores: dict[str, float] = {}  # init="auto": held-out MSE of each start
        _int(owner, "refine_rounds", refine_rounds, 0)
        for name, v, ok in (("ridge", ridge, "> 0"), ("anneal", anneal, ">= 0")):
            if (not isinstance(v, (int, float)) or isinstance(v, bool)
                    or not (v > 0 if ok == "> 0" else v >= 0)):
                raise ValueError(f"{owner}: {name} must be a number {ok}, got {v!r}")
        if encoder not in ("ils", "beam"):
            raise ValueError(f"{owner}: encoder must be 'ils' or 'beam', got {encoder!r}")
        _int(owner, "ils_iters", ils_iters, 0)
        _int(owner, "train_ils_iters", train_ils_iters, 0)
        _int(owner, "icm_iters", icm_iters, 1)
        nperts = min(4, m) if nperts is None else nperts
        _int(owner, "nperts", nperts, 1, m)
        if m * self.ksub > 8192:
            raise ValueError(f"{owner}: m * 2^nbits = {m * self.ksub} codewords; the "
                             f"joint update solves a system of that size, at most 8192")
        self.refine_rounds, self.ridge = refine_rounds, float(ridge)
        self.encoder, self.ils_iters, self.train_ils_iters = encoder, ils_iters, train_ils_iters
        self.icm_iters, self.nperts, self.anneal = icm_iters, nperts, float(anneal)
        self.rq_mse: float | None = None
        self.mse_history: list[float] = []

    def _ils(self, x, books, codes, iters, rng):
        return ils(x, books, codes, iters, self.icm_iters, self.nperts, rng, self._tables(books))

    def _encode(self, x: np.ndarray) -> np.ndarray:
        codes = self._beam(x, self.codebooks)
        if self.encoder == "beam":
            return codes
        rng = np.random.default_rng([self.seed, 1])
        return self._ils(x, self.codebooks, codes, self.ils_iters, rng)

    def _train(self, x: np.ndarray, **kw) -> None:
        start = self._choose_start(x) if self.init == "auto" else self.init
        if start == "random":
            self._train_random(x)
            return
        super()._train(x, **kw)
        rq_books = self.codebooks
        codes = beam_search(x, rq_books, self.beam_size)
        self.rq_mse = float(sq_errors(x, rq_books, codes).mean())
        self.mse_history = [self.rq_mse]
        if self.encoder == "beam":
            self._train_beam(x, codes)
        else:
            self._train_ils(x, codes)
        final = float(sq_errors(x, self.codebooks, self._encode(x)).mean())
        if self.codebooks is not rq_books and not final <= self.rq_mse:
            self.codebooks = rq_books  # never worse than the RQ on the training set

    def _train_beam(self, x: np.ndarray, codes: np.ndarray) -> None:
        best = self.rq_mse
        for _ in range(self.refine_rounds):
            books = lsq_codebooks(x, codes, self.codebooks, self.ridge)
            new_codes = beam_search(x, books, self.beam_size)
            e = float(sq_errors(x, books, new_codes).mean())
            self.mse_history.append(e)
            if not e < best:
                break
            self.codebooks, codes, best = books, new_codes, e

    def _train_ils(self, x: np.ndarray, codes: np.ndarray) -> None:
        rng = np.random.default_rng([self.seed, 2])
        std = x.astype(np.float64).std(0)

        def enc(b):  # the encoder's codes (beam start, ILS): never codes carried over rounds,
            # which can reach a training error no encoder reaches from scratch again
            return self._ils(x, b, self._beam(x, b), self.train_ils_iters, rng)

        books = self.codebooks
        codes = enc(books)
        best = float(sq_errors(x, books, codes).mean())
        self.mse_history.append(best)
        for i in range(self.refine_rounds):
            books = lsq_codebooks(x, codes, books, self.ridge)
            t = self.anneal * (1.0 - (i + 1.0) / self.refine_rounds) ** 0.5
            fit = codes = enc(books)
            if t > 0:  # SR-D: the next codes from perturbed codebooks
                noise = rng.standard_normal(books.shape) * (t * std / self.m)
                codes = enc((books + noise).astype(np.float32))
            e = float(sq_errors(x, books, fit).mean())  # what the encoder gets with books
            self.mse_history.append(e)
            if e < best:
                self.codebooks, best = books, e

    def _choose_start(self, x: np.ndarray) -> str:
        """init="auto": both starts trained on a random 90 % of ``x`` (seeded) and scored by
        their MSE on the other 10 % (``start_scores``); the better ("rq" on a tie, or when
        ``x`` is too small to split with 2^nbits vectors left to train on) is then trained on
        all of ``x``."""
        n = x.shape[0]
        hold = n // 10
        self.start_scores = {}
        if hold == 0 or n - hold < self.ksub:
            return "rq"
        perm = np.random.default_rng([self.seed, 4]).permutation(n)
        fit, held = x[np.sort(perm[hold:])], x[np.sort(perm[:hold])]
        for start in ("rq", "random"):
            q = type(self)(**{**self.config(), "init": start}).train(fit)
            self.start_scores[start] = q.mse(held)
        return "random" if self.start_scores["random"] < self.start_scores["rq"] else "rq"

    def _train_random(self, x: np.ndarray) -> None:
        """FAISS's LSQ from random codes: ``max(refine_rounds, 1)`` rounds of (ILS from the
        current codes, carried over; the joint least-squares update shrunk toward zero, ridge
        as in :func:`lsq_codebooks`), the last update's codebooks kept."""
        if x.shape[0] < self.ksub:
            raise ValueError(f"AdditiveQuantizer: {x.shape[0]} training vectors for 2^nbits = "
                             f"{self.ksub} codewords per codebook; need >= {self.ksub}")
        rng = np.random.default_rng([self.seed, 3])
        codes = rng.integers(0, self.ksub, size=(x.shape[0], self.m))
        zero = np.zeros((self.m, self.ksub, self.d), dtype=np.float32)
        books = lsq_codebooks(x, codes, zero, self.ridge)
        self.rq_mse, self.mse_history = None, []
        for _ in range(max(self.refine_rounds, 1)):
            codes = self._ils(x, books, codes, self.train_ils_iters, rng)
            books = lsq_codebooks(x, codes, zero, self.ridge)
            self.mse_history.append(float(sq_errors(x, books, codes).mean()))
        self.codebooks = books

    def config(self) -> dict:
        return {**super().config(), "init": self.init, "refine_rounds": self.refine_rounds,
                "ridge": self.ridge,
                "encoder": self.encoder, "ils_iters": self.ils_iters,
                "train_ils_iters": self.train_ils_iters, "icm_iters": self.icm_iters,
                "nperts": self.nperts, "anneal": self.anneal}


class MultiLevelVQ(VQBase):
    """Two-level quantizer (IVF-PQ's codes without the index): a coarse k-means of
    ``2^coarse_bits`` centroids, then a product (``fine="pq"``) or residual (``fine="rq"``,
    ``beam_size``) quantizer of ``m`` x ``nbits`` trained on the residuals to the coarse
    centroid. Codes (n, 1 + m) int64: column 0 the coarse id, then the fine codes;
    ``code_size_bits = coarse_bits + m * nbits``.

    >>> x = np.random.default_rng(3).standard_normal((1000, 8)).astype(np.float32)
    >>> q = MultiLevelVQ(8, coarse_bits=4, m=2, nbits=4).train(x)
    >>> q.encode(x).shape, q.code_size_bits
    ((1000, 3), 12)
    """

    kind = "mlvq"

    def __init__(self, d: int, coarse_bits: int = 8, m: int = 8, nbits: int = 8,
                 fine: str = "pq", beam_size: int = 1, n_iter: int = 25, seed: int = 0):
        super().__init__(d)
        _int("MultiLevelVQ", "coarse_bits", coarse_bits, 1, 16)
        if fine not in ("pq", "rq"):
            raise ValueError(f"MultiLevelVQ: fine must be 'pq' or 'rq', got {fine!r}")
        self.coarse_bits, self.m, self.nbits, self.fine_kind = coarse_bits, m, nbits, fine
        self.beam_size, self.n_iter, self.seed = beam_size, n_iter, seed
        self.kc = 1 << coarse_bits
        self.fine: VQBase = (ProductQuantizer(d, m, nbits, n_iter=n_iter, seed=seed + 1)
                             if fine == "pq" else
                             ResidualQuantizer(d, m, nbits, beam_size, n_iter, seed + 1))
        if fine == "pq":
            _int("MultiLevelVQ", "beam_size", beam_size, 1)
        self.coarse: np.ndarray | None = None  # (2^coarse_bits, d) float32

    def _train(self, x: np.ndarray, **kw) -> None:
        if kw:
            raise TypeError(f"MultiLevelVQ.train: unexpected arguments {sorted(kw)}")
        if x.shape[0] < self.kc:
            raise ValueError(f"MultiLevelVQ: {x.shape[0]} training vectors for 2^coarse_bits "
                             f"= {self.kc} coarse centroids; need >= {self.kc}")
        km = KMeans(self.d, self.kc, n_iter=self.n_iter, seed=self.seed).train(x)
        self.coarse = km.centroids
        self.fine.train(x - self.coarse[assign(x, self.coarse)[0]])

    def _encode(self, x: np.ndarray) -> np.ndarray:
        c0 = assign(x, self.coarse)[0]
        return np.concatenate([c0[:, None], self.fine.encode(x - self.coarse[c0])], axis=1)

    def _decode(self, codes: Any) -> np.ndarray:
        c = as_codes(codes, 1 + self.m, [self.kc] + [1 << self.nbits] * self.m)
        return self.coarse[c[:, 0]] + self.fine.decode(c[:, 1:])

    @property
    def code_size_bits(self) -> int:
        return self.coarse_bits + self.fine.code_size_bits

    def config(self) -> dict:
        return {"d": self.d, "coarse_bits": self.coarse_bits, "m": self.m, "nbits": self.nbits,
                "fine": self.fine_kind, "beam_size": self.beam_size, "n_iter": self.n_iter,
                "seed": self.seed}

    def state(self) -> dict[str, torch.Tensor]:
        if self.coarse is None:
            return {}
        return {"coarse": torch.from_numpy(self.coarse),
                **{f"fine.{k}": v for k, v in self.fine.state().items()}}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if "coarse" not in tensors:
            raise ValueError(f"MultiLevelVQ: expected the tensor 'coarse', got {sorted(tensors)}")
        c = tensors["coarse"].to(torch.float32).numpy()
        if c.shape != (self.kc, self.d):
            raise ValueError(f"MultiLevelVQ: coarse of shape {tuple(c.shape)}, expected "
                             f"({self.kc}, {self.d})")
        fine = {k[5:]: v for k, v in tensors.items() if k.startswith("fine.")}
        if set(tensors) - {"coarse"} != {f"fine.{k}" for k in fine}:
            raise ValueError(f"MultiLevelVQ: unexpected tensors {sorted(tensors)}")
        self.fine._set_state(fine)
        self.fine.is_trained = True
        self.coarse = np.ascontiguousarray(c)
