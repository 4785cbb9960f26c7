"""Synthetic calibration batches shared by the observer tests."""

from __future__ import annotations

import math

import numpy as np
import torch


def make_batches(kind: str, seed: int = 0, shape=(16, 96), n: int = 4) -> list[torch.Tensor]:
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if kind == "gauss":
            x = g.standard_normal(shape) * (1 + 0.5 * i) + 0.1 * i
        elif kind == "laplace":
            x = g.laplace(size=shape)
        elif kind == "outliers":
            x = g.standard_normal(shape)
            x.reshape(-1)[i::97] *= 40
        elif kind == "uniform":
            x = g.uniform(-1 + 0.2 * i, 2, shape)
        elif kind == "relu":
            x = np.maximum(g.standard_normal(shape), 0) * (1 + i)
        else:
            raise ValueError(kind)
        out.append(torch.from_numpy(x.astype(np.float32)))
    return out


def feed(obs, batches):
    for b in batches:
        assert obs(b) is b
    return obs


def ref_kl_threshold_bin_numpy(hist, levels: int, start: int) -> int:
    """TensorRT entropy calibration (the definition of test_observers_search's loop reference),
    vectorized per candidate with bincount (for 2048 bins)."""
    hist = np.asarray(hist, np.float64)
    n = hist.size
    best_i, best = n, math.inf
    for i in range(start, n + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        lev = np.arange(i) * levels // i
        mass = np.bincount(lev, weights=hist[:i], minlength=levels)
        nzc = np.bincount(lev, weights=(p > 0).astype(np.float64), minlength=levels)
        nz = p > 0
        q = np.zeros(i)
        q[nz] = mass[lev[nz]] / nzc[lev[nz]]
        if q.sum() == 0 or (q[nz] == 0).any():
            continue
        pn, qn = p[nz] / p.sum(), q[nz] / q.sum()
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl <= best:
            best_i, best = i, kl
    return best_i
