"""k-means (Lloyd) on the C++ nearest-centroid search, FAISS's recipe: k-means++ or random
initialization from a seeded numpy Generator, at most ``max_points_per_centroid * k`` training
points (a random subsample beyond that), Lloyd iterations, empty clusters repaired by splitting
the largest one, weighted training.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> x = np.concatenate([rng.normal(c, 0.1, (100, 2)) for c in (0.0, 5.0, 10.0)])
>>> km = KMeans(d=2, k=3, seed=0).train(x)
>>> sorted(round(float(v)) for v in km.centroids[:, 0])
[0, 5, 10]
>>> km.encode(x[:2]).shape
(2, 1)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import VQBase, as_codes
from .search import assign

__all__ = ["KMeans", "progressive_dim_kmeans"]

# The relative perturbation of a split centroid (FAISS's EPS = 1 / 1024).
SPLIT_EPS = 1.0 / 1024


class KMeans(VQBase):
    """k-means quantizer of d-dimensional vectors with ``k`` centroids; codes (n, 1) int64.

    ``train(x, weights=None)`` runs up to ``n_iter`` Lloyd iterations (stopping early when the
    objective improves by less than ``tol`` relatively); ``objective_history`` lists the
    (weighted) sum of squared distances of the training points to their nearest centroid at
    each iteration's assignment; ``init_centroids`` the starting centroids.

    >>> km = KMeans(d=4, k=2, n_iter=5).train(np.eye(4)[[0, 0, 1, 1]] * 3)
    >>> km.decode(km.encode(np.eye(4)[[0]] * 3)).round(3).tolist()
    [[3.0, 0.0, 0.0, 0.0]]
    """

    kind = "kmeans"

    def __init__(self, d: int, k: int, n_iter: int = 25, seed: int = 0,
                 init: str = "k-means++", tol: float = 1e-7, verbose: bool = False,
                 max_points_per_centroid: int = 256):
        super().__init__(d)
        for name, v, lo in (("k", k, 1), ("n_iter", n_iter, 0), ("seed", seed, 0),
                            ("max_points_per_centroid", max_points_per_centroid, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"KMeans: {name} must be an int >= {lo}, got {v!r}")
        if init not in ("k-means++", "random"):
            raise ValueError(f"KMeans: init must be 'k-means++' or 'random', got {init!r}")
        if not (isinstance(tol, (int, float)) and tol >= 0):
            raise ValueError(f"KMeans: tol must be a number >= 0, got {tol!r}")
        self.k, self.n_iter, self.seed, self.init = k, n_iter, seed, init
        self.tol, self.verbose = float(tol), bool(verbose)
        self.max_points_per_centroid = max_points_per_centroid
        self.centroids: np.ndarray | None = None
        self.init_centroids: np.ndarray | None = None
        self.objective_history: list[float] = []

    # ---- training ----------------------------------------------------------------------
    def _train(self, x: np.ndarray, weights: Any = None, init_centroids: Any = None) -> None:
        n, k = x.shape[0], self.k
        if init_centroids is not None:  # a warm start (progressive_dim_kmeans)
            init_centroids = np.asarray(init_centroids, dtype=np.float32)
            if init_centroids.shape != (k, self.d) or not np.isfinite(init_centroids).all():
                raise ValueError(f"KMeans: init_centroids must be finite, of shape ({k}, "
                                 f"{self.d}), got {init_centroids.shape}")
        w = None if weights is None else _check_weights(weights, n, k)
        if n < k:
            raise ValueError(f"KMeans: {n} training vectors for k = {k} centroids; need >= k")
        rng = np.random.default_rng(self.seed)
        cap = k * self.max_points_per_centroid
        if n > cap:  # FAISS: a random subsample of max_points_per_centroid * k points
            sel = np.sort(rng.choice(n, cap, replace=False))
            x = x[sel]
            if w is not None:
                w = w[sel]
                if np.count_nonzero(w) < k:  # keep the subsample usable
                    raise ValueError(f"KMeans: fewer than k = {k} positive weights in the "
                                     f"subsample of {cap} points; raise max_points_per_centroid")
        c = self._initial(x, w, rng) if init_centroids is None else init_centroids.copy()
        self.init_centroids = c.copy()
        self.objective_history = []
        for it in range(self.n_iter):
            codes, dist = assign(x, c)
            obj = float(np.dot(dist.astype(np.float64), w) if w is not None else
                        dist.astype(np.float64).sum())
            self.objective_history.append(obj)
            if self.verbose:
                print(f"KMeans iteration {it}: objective {obj:.6g}")
            if it > 0 and self.objective_history[-2] - obj <= self.tol * abs(obj):
                break
            c = _update(x, w, codes, c, rng)
        self.centroids = c

    def _initial(self, x: np.ndarray, w: np.ndarray | None, rng: np.random.Generator):
        n, k = x.shape[0], self.k
        p = None if w is None else w / w.sum()
        if self.init == "random":
            return x[rng.choice(n, k, replace=False, p=p)].copy()
        # greedy k-means++ (Arthur & Vassilvitskii; scikit-learn's default): each step draws
        # 2 + log(k) candidates with probability proportional to weight x squared distance to
        # the nearest centroid so far and keeps the one that lowers the total most.
        x64 = x.astype(np.float64)
        xn = (x64 ** 2).sum(axis=1)
        wt = np.ones(n) if w is None else w
        trials = 2 + int(np.log(k))

        def d2_to(idx):  # (n, len(idx)) squared distances, float64 (>= -rounding)
            c = x64[idx]
            return (x64 @ (-2 * c.T) + (c ** 2).sum(axis=1)[None, :]) + xn[:, None]

        chosen = [int(rng.choice(n, p=p))]
        d2 = np.maximum(d2_to(chosen)[:, 0], 0)
        for _ in range(1, k):
            score = d2 * wt
            tot = score.sum()
            if tot > 0:
                cand = rng.choice(n, trials, p=score / tot)
                pot = np.minimum(d2[:, None], d2_to(cand))
                best = int(np.argmin(wt @ pot))
                nxt, d2 = int(cand[best]), np.maximum(pot[:, best], 0)
            else:  # every point (of positive weight) sits on a centroid: any unused one
                free = np.setdiff1d(np.flatnonzero(wt > 0), chosen)
                nxt = int(rng.choice(free if free.size else np.arange(n)))
            chosen.append(nxt)
        return x[np.array(chosen)].copy()

    # ---- the VQBase interface ----------------------------------------------------------
    def _encode(self, x: np.ndarray) -> np.ndarray:
        return assign(x, self.centroids)[0][:, None]

    def _decode(self, codes: Any) -> np.ndarray:
        return self.centroids[as_codes(codes, 1, self.k)[:, 0]]

    @property
    def code_size_bits(self) -> int:
        return max(1, int(np.ceil(np.log2(self.k))))

    def config(self) -> dict:
        return {"d": self.d, "k": self.k, "n_iter": self.n_iter, "seed": self.seed,
                "init": self.init, "tol": self.tol, "verbose": self.verbose,
                "max_points_per_centroid": self.max_points_per_centroid}

    def state(self) -> dict[str, torch.Tensor]:
        return {} if self.centroids is None else {"centroids": torch.from_numpy(self.centroids)}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"centroids"}:
            raise ValueError(f"KMeans: expected the tensor 'centroids', got {sorted(tensors)}")
        c = tensors["centroids"].to(torch.float32).numpy()
        if c.shape != (self.k, self.d):
            raise ValueError(f"KMeans: centroids of shape {tuple(c.shape)}, expected "
                             f"({self.k}, {self.d})")
        self.centroids = np.ascontiguousarray(c)


def progressive_dim_kmeans(x: np.ndarray, k: int, steps: int = 10, n_iter: int = 10,
                           seed: int = 0, apply_pca: bool = True, init: str = "k-means++"
                           ) -> np.ndarray:
    """FAISS's ``ProgressiveDimClustering``: (k, d) float32 centroids of ``x`` (n, d) by
    k-means whose dimension grows. The data are rotated onto their principal axes (PCA in
    float64, centred, axes by decreasing variance, each axis' sign fixed by its largest entry
    being positive), then step t = 0..steps-1 runs :class:`KMeans` (``n_iter`` iterations,
    ``seed``; the first step starts by ``init``, FAISS's is "random") on the first
    ``int(d ** ((t + 1) / steps))`` coordinates, started (t > 0) from the previous step's
    centroids padded with zeros; the result is rotated back. The leading, high-variance
    directions are clustered first and the later ones only refine them: fewer centroids are
    spent on low-variance noise (FAISS's ResidualQuantizer trains each stage so by default,
    ``train_type = Train_progressive_dim``, 10 steps of 10 iterations).

    >>> x = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    >>> progressive_dim_kmeans(x, 8, steps=4, n_iter=5).shape
    (8, 16)
    """
    for name, v, lo in (("k", k, 1), ("steps", steps, 1), ("n_iter", n_iter, 0),
                        ("seed", seed, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"progressive_dim_kmeans: {name} must be an int >= {lo}, "
                             f"got {v!r}")
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype.kind not in "fiu" or not np.isfinite(x).all():
        raise ValueError(f"progressive_dim_kmeans: x must be a finite (n, d) array, got "
                         f"shape {x.shape}, dtype {x.dtype}")
    d = x.shape[1]
    x64 = x.astype(np.float64)
    mean = x64.mean(0) if apply_pca else np.zeros(d)
    rot = np.eye(d)
    if apply_pca:
        xc = x64 - mean
        _, vec = np.linalg.eigh(xc.T @ xc)
        rot = vec[:, ::-1]  # decreasing variance
        rot = rot * np.sign(rot[np.abs(rot).argmax(0), np.arange(d)])[None, :]
    xp = np.ascontiguousarray(((x64 - mean) @ rot).astype(np.float32))
    c = None
    for t in range(steps):
        di = max(1, int(d ** ((1.0 + t) / steps)))
        start = None
        if c is not None:
            start = np.zeros((k, di), dtype=np.float32)
            start[:, :c.shape[1]] = c[:, :di]
        km = KMeans(di, k, n_iter=n_iter, seed=seed, init=init)
        c = km.train(np.ascontiguousarray(xp[:, :di]), init_centroids=start).centroids
    return np.ascontiguousarray((c.astype(np.float64) @ rot.T + mean).astype(np.float32))


def _check_weights(weights: Any, n: int, k: int) -> np.ndarray:
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().numpy()
    w = np.asarray(weights)
    if w.dtype.kind not in "fiu":
        raise ValueError(f"KMeans: weights must be numeric, got dtype {w.dtype}")
    w = w.astype(np.float64)
    if w.shape != (n,):
        raise ValueError(f"KMeans: weights must have shape ({n},), got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("KMeans: weights must be finite and >= 0")
    if np.count_nonzero(w) < k:
        raise ValueError(f"KMeans: {np.count_nonzero(w)} positive weights for k = {k} "
                         f"centroids; need >= k")
    return w


def _update(x: np.ndarray, w: np.ndarray | None, codes: np.ndarray, c: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """The (weighted) means of the clusters (float64 sums), then the empty ones repaired."""
    k, d = c.shape
    wt = np.ones(x.shape[0]) if w is None else w
    mass = np.bincount(codes, weights=wt, minlength=k)
    order = np.argsort(codes, kind="stable")
    sc = codes[order]
    starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]])
    sums = np.zeros((k, d))
    sums[sc[starts]] = np.add.reduceat(x[order].astype(np.float64) * wt[order, None], starts)
    new = c.astype(np.float64).copy()
    full = mass > 0
    new[full] = sums[full] / mass[full, None]
    _split_empty(new, mass, x)
    return new.astype(np.float32)


def _split_empty(c: np.ndarray, mass: np.ndarray, x: np.ndarray) -> None:
    """FAISS's repair: each empty cluster takes a copy of the largest one, the two moved apart
    symmetrically (coordinate t scaled by 1 +- SPLIT_EPS, alternating signs; an additive
    SPLIT_EPS x the data's scale where the coordinate is zero), the mass shared."""
    scale = float(np.sqrt((x.astype(np.float64) ** 2).mean())) or 1.0
    sign = np.where(np.arange(c.shape[1]) % 2 == 0, 1.0, -1.0)
    for e in np.flatnonzero(mass <= 0):
        big = int(np.argmax(mass))
        delta = SPLIT_EPS * np.where(c[big] != 0, np.abs(c[big]), scale) * sign
        c[e] = c[big] + delta
        c[big] = c[big] - delta
        mass[e] = mass[big] / 2
        mass[big] -= mass[e]
