"""Lattice quantizers: the exact nearest point of Z^n, D_n and E8 (Conway & Sloane, "Fast
quantizing and decoding algorithms for lattice quantizers and codes", IEEE Trans. IT 28, 1982;
SPLAG ch. 20) and finite codes by Voronoi (nested-lattice) coding (Conway & Sloane, "A fast
encoding method for lattice codes and quantizers", IEEE Trans. IT 29, 1983).

Tie rules of the nearest-point functions (inputs exactly half-way between lattice points):

- ``Z``: a coordinate at ``m + 1/2`` rounds up, to ``m + 1`` (``floor(x + 1/2)``);
- ``D_n``: if the rounded vector has an odd sum, the coordinate with the largest rounding error
  (the first such coordinate on a tie) is rounded the other way; a coordinate that rounded
  exactly (error 0) goes up by one;
- ``E8``: of the two candidates (``D8`` and ``D8 + 1/2``) the integer one on equal distance.

The Voronoi code of ``L`` with ``r = 2**bits_per_dim`` holds the ``r**dim`` points of ``L`` in
the Voronoi region of ``r L`` (translated by a tiny shift vector ``a``, whose coordinates are
rationally independent, so that no point of ``L`` lies on its boundary: that picks exactly one
point of each coset of ``r L``). A block's code is its lattice point's integer coordinates in a
generator basis, modulo ``r``; decoding is ``y = c G - r Q_L((c G - a) / r)``. A point outside
the region (overload) decodes to the code point congruent to it modulo ``r L``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .base import VQBase, as_codes

__all__ = ["LatticeQuantizer", "nearest_z", "nearest_dn", "nearest_e8", "nearest_point",
           "generator_matrix", "lattice_codebook"]


def nearest_z(x: np.ndarray) -> np.ndarray:
    """The nearest point of Z^n to each row of ``x`` (float64 array of the same shape)."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5)


def nearest_dn(x: np.ndarray) -> np.ndarray:
    """The nearest point of D_n (integer vectors with an even sum) to each row of ``x``
    (shape (..., n)): round, then fix the parity by rounding the coordinate with the largest
    rounding error the other way."""
    x = np.asarray(x, dtype=np.float64)
    f = nearest_z(x)
    odd = np.fmod(f.sum(axis=-1), 2.0) != 0
    if odd.any():
        xo, fo = x[odd], f[odd]
        err = xo - fo
        k = np.argmax(np.abs(err), axis=-1)
        rows = np.arange(len(k))
        fo[rows, k] += np.where(err[rows, k] >= 0, 1.0, -1.0)
        f[odd] = fo
    return f


def nearest_e8(x: np.ndarray) -> np.ndarray:
    """The nearest point of E8 = D8 u (D8 + 1/2) to each row of ``x`` (shape (..., 8)): the
    closer of the nearest points of the two cosets."""
    x = np.asarray(x, dtype=np.float64)
    y0 = nearest_dn(x)
    y1 = nearest_dn(x - 0.5) + 0.5
    d0 = ((x - y0) ** 2).sum(axis=-1)
    d1 = ((x - y1) ** 2).sum(axis=-1)
    return np.where((d1 < d0)[..., None], y1, y0)


_NEAREST = {"Z": nearest_z, "D4": nearest_dn, "E8": nearest_e8}
_DIM = {"Z": 1, "D4": 4, "E8": 8}
_CLIP_STEPS = 12  # bisection steps of the radial clip of overloaded blocks
_TRAIN_BLOCKS = 1 << 14  # train() fits the scale on at most this many blocks
_PRIMES = np.array([2.0, 3.0, 5.0, 7.0, 11.0, 13.0, 17.0, 19.0])


def nearest_point(x: np.ndarray, lattice: str) -> np.ndarray:
    """The nearest point of ``lattice`` ("Z", "D4" or "E8") to each row of ``x`` (the last
    axis is the lattice's dimension; any for "Z")."""
    if lattice not in _NEAREST:
        raise ValueError(f"lattice must be one of {sorted(_NEAREST)}, got {lattice!r}")
    x = np.asarray(x, dtype=np.float64)
    if lattice != "Z" and x.shape[-1] != _DIM[lattice]:
        raise ValueError(f"{lattice} points have {_DIM[lattice]} coordinates, got {x.shape[-1]}")
    return _NEAREST[lattice](x)


def generator_matrix(lattice: str) -> np.ndarray:
    """A generator matrix (rows: a basis) of ``lattice``: Z the identity; D4 rows 2e1 and
    e_i - e_(i-1); E8 those of D8's first seven and (1/2, ..., 1/2) (SPLAG fig. 4.10's form)."""
    if lattice not in _DIM:
        raise ValueError(f"lattice must be one of {sorted(_DIM)}, got {lattice!r}")
    n = _DIM[lattice]
    if n == 1:
        return np.ones((1, 1))
    g = np.eye(n) - np.eye(n, k=-1)
    g[0, 0] = 2.0
    if lattice == "E8":
        g[7] = 0.5
    return g


def lattice_codebook(lattice: str, bits_per_dim: int, centered: bool = False) -> np.ndarray:
    """Every point of the Voronoi code of ``lattice`` ("Z" (1-d), "D4" or "E8") with
    ``r = 2**bits_per_dim``: the ``r**dim`` lattice points in the (shifted) Voronoi region of
    ``r L`` that :class:`LatticeQuantizer` encodes to, as a float64 array (r**dim, dim) in
    lattice units, row ``i`` the point of the code whose base-``r`` digits (most significant
    first) are ``i``. Entries are integers or half-integers (exact in float16).

    The shift that picks one point of each coset puts the code off-centre (its mean is up to
    about ``0.5`` per coordinate); ``centered=True`` subtracts that mean rounded to a
    multiple of 1/64 (entries then stay exact in float16): the code translated to the origin.

    >>> cb = lattice_codebook("D4", 2)
    >>> cb.shape, bool((cb.sum(axis=1) % 2 == 0).all())  # D4: integer points, even sum
    ((256, 4), True)
    """
    if lattice not in _DIM:
        raise ValueError(f"lattice must be one of {sorted(_DIM)}, got {lattice!r}")
    if (not isinstance(bits_per_dim, int) or isinstance(bits_per_dim, bool)
            or not 1 <= bits_per_dim <= 16 or bits_per_dim * _DIM[lattice] > 16):
        raise ValueError(f"lattice_codebook: bits_per_dim must be an int >= 1 with "
                         f"bits_per_dim * {_DIM[lattice]} <= 16 for {lattice}, "
                         f"got {bits_per_dim!r}")
    q = LatticeQuantizer(_DIM[lattice], lattice, bits_per_dim, scale=1.0)
    n = _DIM[lattice]
    idx = np.arange(q.r ** n)
    digits = (idx[:, None] // q.r ** np.arange(n - 1, -1, -1)) % q.r
    points = q._point_of(digits)
    if centered:
        points = points - np.round(points.mean(axis=0) * 64) / 64
    return points


class LatticeQuantizer(VQBase):
    """Vectors of dimension ``d`` quantized block by block (``dim`` = 1, 4 or 8 coordinates)
    to a Voronoi code of the lattice Z, D4 or E8 with ``bits_per_dim`` bits per coordinate.

    Each vector is divided by ``scale`` and its blocks are rounded to the nearest lattice point
    (exact, Conway & Sloane's algorithms), whose integer coordinates in the generator basis
    modulo ``r = 2**bits_per_dim`` are the code: ``codes`` is (n, d) with values in [0, r),
    ``code_size_bits = d * bits_per_dim``. A block whose nearest lattice point lies outside
    the code (overload) is clipped radially. ``train(x)`` picks the scale minimizing the
    reconstruction MSE on ``x`` (on at most 16384 evenly spaced blocks of it: a log-spaced grid
    around ``rms(x) / r``, refined by golden-section search); with a given ``scale`` the
    quantizer is ready at once and ``train`` only checks ``x``. The scale is the one learned
    tensor (``state()["scale"]``, float64).

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
    >>> q = LatticeQuantizer(16, lattice="E8", bits_per_dim=2).train(x)
    >>> codes = q.encode(x); codes.shape, int(codes.max()) < 4
    ((1000, 16), True)
    >>> q.mse(x) / 16 < 0.12  # per coordinate, unit-variance data
    True
    """

    kind = "lattice"

    def __init__(self, d: int, lattice: str = "E8", bits_per_dim: int = 2,
                 scale: float | None = None):
        super().__init__(d)
        if lattice not in _DIM:
            raise ValueError(f"lattice must be one of {sorted(_DIM)}, got {lattice!r}")
        self.dim = _DIM[lattice]
        if d % self.dim:
            raise ValueError(f"d = {d} is not a multiple of {lattice}'s dimension {self.dim}")
        if (not isinstance(bits_per_dim, int) or isinstance(bits_per_dim, bool)
                or not 1 <= bits_per_dim <= 16):
            raise ValueError(f"bits_per_dim must be an int in [1, 16], got {bits_per_dim!r}")
        self.lattice, self.bits_per_dim = lattice, bits_per_dim
        self.r = 2 ** bits_per_dim
        self._given_scale = None if scale is None else self._check_scale(scale)
        self.scale = self._given_scale
        self.G = generator_matrix(lattice)
        self.G_inv = np.linalg.inv(self.G)
        self.shift = 1e-3 * np.sqrt(_PRIMES[: self.dim])
        self.is_trained = self.scale is not None

    @staticmethod
    def _check_scale(scale: Any) -> float:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)):
            raise TypeError(f"scale must be a positive float, got {scale!r}")
        s = float(scale)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"scale must be a positive finite float, got {scale!r}")
        return s

    # ---- the lattice code, on blocks in lattice units ----------------------------------
    def _lattice_point(self, blocks: np.ndarray) -> np.ndarray:
        return _NEAREST[self.lattice](blocks)

    def _code_of(self, y: np.ndarray) -> np.ndarray:
        u = np.rint(y @ self.G_inv).astype(np.int64)
        return np.mod(u, self.r)

    def _point_of(self, c: np.ndarray) -> np.ndarray:
        z = c.astype(np.float64) @ self.G
        return z - self.r * self._lattice_point((z - self.shift) / self.r)

    def _code_point(self, blocks: np.ndarray) -> np.ndarray:
        """The code point for each block (lattice units): its nearest lattice point if that
        lies in the code's region, else (overload) the nearest lattice point of ``t * block``
        for the largest ``t`` in (0, 1) that bisection finds inside (a radial clip)."""
        y = self._lattice_point(blocks)
        out = ~(self._point_of(self._code_of(y)) == y).all(axis=1)
        if out.any():
            xo = blocks[out]
            lo, hi = np.zeros(len(xo)), np.ones(len(xo))
            for _ in range(_CLIP_STEPS):
                mid = (lo + hi) / 2
                ym = self._lattice_point(xo * mid[:, None])
                inside = (self._point_of(self._code_of(ym)) == ym).all(axis=1)
                lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
            y[out] = self._lattice_point(xo * lo[:, None])
        return y

    def _round_trip(self, x: np.ndarray, scale: float) -> np.ndarray:
        blocks = x.reshape(-1, self.dim).astype(np.float64) / scale
        return self._code_point(blocks) * scale

    # ---- VQBase -------------------------------------------------------------------------
    def _train(self, x: np.ndarray, **kw) -> None:
        if kw:
            raise TypeError(f"LatticeQuantizer.train: unexpected arguments {sorted(kw)}")
        if self._given_scale is not None:
            return
        xb = x.reshape(-1, self.dim).astype(np.float64)
        if len(xb) > _TRAIN_BLOCKS:  # an evenly spaced subset of the blocks
            xb = xb[np.linspace(0, len(xb) - 1, _TRAIN_BLOCKS).astype(np.int64)]
        rms = float(np.sqrt((xb ** 2).mean()))
        if rms == 0.0:
            self.scale = 1.0
            return

        def loss(log_s: float) -> float:
            return float(((self._round_trip(xb, math.exp(log_s)) - xb) ** 2).sum())

        lo, hi = math.log(rms / self.r / 4), math.log(rms / self.r * 32)
        grid = np.linspace(lo, hi, 25)
        vals = [loss(t) for t in grid]
        i = int(np.argmin(vals))
        a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        best_t, best_v = grid[i], vals[i]
        inv_phi = (math.sqrt(5) - 1) / 2
        c, e = b - inv_phi * (b - a), a + inv_phi * (b - a)
        fc, fe = loss(c), loss(e)
        for _ in range(20):
            if fc <= fe:
                b, e, fe = e, c, fc
                c = b - inv_phi * (b - a)
                fc = loss(c)
            else:
                a, c, fc = c, e, fe
                e = a + inv_phi * (b - a)
                fe = loss(e)
        for t, v in ((c, fc), (e, fe)):
            if v < best_v:
                best_t, best_v = t, v
        self.scale = math.exp(best_t)

    def _encode(self, x: np.ndarray) -> np.ndarray:
        blocks = x.reshape(-1, self.dim).astype(np.float64) / self.scale
        return self._code_of(self._code_point(blocks)).reshape(x.shape[0], self.d)

    def _decode(self, codes: Any) -> np.ndarray:
        c = as_codes(codes, self.d, self.r)
        y = self._point_of(c.reshape(-1, self.dim)) * self.scale
        return y.reshape(c.shape[0], self.d).astype(np.float32)

    @property
    def code_size_bits(self) -> int:
        return self.d * self.bits_per_dim

    def config(self) -> dict:
        return {"d": self.d, "lattice": self.lattice, "bits_per_dim": self.bits_per_dim,
                "scale": self._given_scale}

    def state(self) -> dict[str, torch.Tensor]:
        if self.scale is None:
            return {}
        return {"scale": torch.tensor([self.scale], dtype=torch.float64)}

    def _set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"scale"} or tensors["scale"].numel() != 1:
            raise ValueError(f"LatticeQuantizer: expected one tensor 'scale', "
                             f"got {sorted(tensors)}")
        self.scale = self._check_scale(float(tensors["scale"].item()))
