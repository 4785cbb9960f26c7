"""qkern.vq.lut: weighted 1-D k-means against an exact dynamic program (optimal 1-D clusters are
contiguous runs of the sorted values) and brute-force nearest levels, and LUTQuantizer's
tables, codes and checks."""

from __future__ import annotations

import numpy as np
import pytest

from qkern.vq import LUTQuantizer, VQBase
from qkern.vq.lut import weighted_kmeans_1d


def objective(v: np.ndarray, w: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Per row: sum of w * (v - nearest level)^2, by brute force over the levels."""
    d2 = (v[:, :, None] - levels[:, None, :]) ** 2
    return (w * d2.min(axis=2)).sum(axis=1)


def dp_optimum(v: np.ndarray, w: np.ndarray, k: int) -> float:
    """The exact minimum of the weighted k-level objective of one row: the optimal clusters
    are runs of the sorted values, best[j] = min_s best'[s] + cost(s, j), O(n^2 k)."""
    o = np.argsort(v)
    v, w = v[o], w[o]
    n = len(v)
    cost = np.full((n + 1, n + 1), np.inf)  # cost[i, j]: one level for v[i:j]
    for i in range(n + 1):
        cost[i, i] = 0.0
        for j in range(i + 1, n + 1):
            ww, vv = w[i:j], v[i:j]
            mean = (ww * vv).sum() / ww.sum() if ww.sum() > 0 else 0.0
            cost[i, j] = (ww * (vv - mean) ** 2).sum()
    best = cost[0].copy()
    for _ in range(k - 1):
        best = (best[:, None] + cost).min(axis=0)
    return float(best[n])


def test_starts_at_the_weighted_quantiles():
    rng = np.random.default_rng(7)
    v = rng.normal(size=(20, 30))
    w = rng.exponential(size=v.shape)
    k = 4
    got = weighted_kmeans_1d(v, w, k=k, max_iter=0)
    for i in range(len(v)):
        o = np.argsort(v[i])
        cum = np.cumsum(w[i][o])
        for j in range(k):  # the first sorted value whose cumulative weight reaches the target
            t = (j + 0.5) / k * cum[-1]
            assert got[i, j] == v[i][o][np.nonzero(cum >= t)[0][0]]


def test_zero_weight_rows_are_fitted_unweighted():
    v = np.random.default_rng(8).normal(size=(6, 40))
    w = np.ones_like(v)
    w[::2] = 0.0
    np.testing.assert_array_equal(weighted_kmeans_1d(v, w, k=4), weighted_kmeans_1d(v, k=4))


@pytest.mark.parametrize("k", [4, 8])
def test_objective_never_increases(k):
    rng = np.random.default_rng(0)
    v = rng.standard_t(3, size=(60, 64))
    w = rng.exponential(size=v.shape)
    prev = None
    for t in range(0, 40):
        cur = objective(v, w, weighted_kmeans_1d(v, w, k=k, max_iter=t))
        if prev is not None:
            assert (cur <= prev * (1 + 1e-12) + 1e-15).all(), t
        prev = cur
    final = weighted_kmeans_1d(v, w, k=k, max_iter=1000)
    np.testing.assert_allclose(objective(v, w, final), prev, rtol=1e-12)  # converged by 40
    # a fixed point: one more Lloyd step from the result changes nothing
    mids = (final[:, 1:] + final[:, :-1]) / 2
    assign = (v[:, :, None] > mids[:, None, :]).sum(axis=2)
    for j in range(k):
        m = assign == j
        has = (w * m).sum(axis=1) > 0
        mean = (w * m * v).sum(axis=1)[has] / (w * m).sum(axis=1)[has]
        np.testing.assert_allclose(final[has, j], mean, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [4, 8])
def test_close_to_the_exact_optimum(k):
    rng = np.random.default_rng(1)
    ratios = []
    for i in range(24):
        v = rng.normal(size=(1, 64))
        w = rng.exponential(size=(1, 64)) if i % 2 else np.ones((1, 64))
        got = objective(v, w, weighted_kmeans_1d(v, w, k=k))[0]
        opt = dp_optimum(v[0], w[0], k)
        assert got >= opt * (1 - 1e-9)  # the DP is the minimum
        ratios.append(got / opt)
    assert np.mean(ratios) < 1.06 and max(ratios) < 1.4


@pytest.mark.parametrize("bits", [2, 3])
def test_exact_when_levels_cover_the_distinct_values(bits):
    rng = np.random.default_rng(2)
    values = rng.normal(size=(50, 2 ** bits))
    pick = rng.integers(0, 2 ** bits, size=(50, 64))
    pick[:, 1::3] = 0  # uneven counts
    x = np.take_along_axis(values, pick, axis=1).astype(np.float32)
    for weights in (None, rng.exponential(size=x.shape) + 0.1):
        q = LUTQuantizer(64, bits=bits).train(x, weights=weights)
        np.testing.assert_array_equal(q.reconstruct(x), x)
    # fewer distinct values than levels, per group of 16
    x = np.repeat(rng.normal(size=(8, 12)), 4, axis=1).astype(np.float32)  # 4 distinct / group
    q = LUTQuantizer(48, bits=bits, group_size=16).train(x)
    np.testing.assert_array_equal(q.reconstruct(x), x)
    for gs in (1, 2):  # groups of one or two values
        q = LUTQuantizer(48, bits=1, group_size=gs).train(x)
        np.testing.assert_array_equal(q.reconstruct(x), x)


def test_weighted_fit_is_better_on_the_weighted_objective():
    rng = np.random.default_rng(3)
    x = rng.standard_t(4, size=(128, 128)).astype(np.float32)
    wts = (rng.exponential(size=x.shape) * (1 + 10 * (rng.random(x.shape) < 0.05)))
    wq = LUTQuantizer(128, bits=3, group_size=64).train(x, weights=wts)
    uq = LUTQuantizer(128, bits=3, group_size=64).train(x)

    def obj(q):
        return (wts * (q.reconstruct(x).astype(np.float64) - x) ** 2).reshape(-1, 64).sum(1)

    ow, ou = obj(wq), obj(uq)
    assert ow.sum() < 0.9 * ou.sum()
    assert (ow <= ou * (1 + 1e-6)).mean() > 0.95
    # and the unweighted fit wins on the unweighted error
    assert uq.mse(x) <= wq.mse(x)


def test_codes_are_the_nearest_levels_per_group():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, 96)).astype(np.float32)
    q = LUTQuantizer(96, bits=2, group_size=32).train(x)
    lv = q.state()["levels"].numpy()
    assert lv.shape == (16, 3, 4) and (np.diff(lv, axis=2) >= 0).all()
    codes = q.encode(x)
    assert codes.shape == x.shape and codes.dtype == np.int64
    groups = x.reshape(16, 3, 32)
    dist = (groups[..., None] - lv[:, :, None, :]) ** 2  # (rows, groups, 32, k)
    got = np.take_along_axis(dist, codes.reshape(16, 3, 32, 1), axis=3)[..., 0]
    np.testing.assert_array_equal(got, dist.min(axis=3))
    np.testing.assert_array_equal(q.decode(codes).reshape(16, 3, 32),
                                  np.take_along_axis(lv, codes.reshape(16, 3, 32), axis=2))
    # a new matrix of the same shape is coded with the trained tables
    y = rng.normal(size=x.shape).astype(np.float32)
    dy = (y.reshape(16, 3, 32)[..., None] - lv[:, :, None, :]) ** 2
    np.testing.assert_allclose(((q.reconstruct(y) - y) ** 2).reshape(16, 3, 32),
                               dy.min(axis=3), rtol=1e-6, atol=1e-12)


def test_sizes_and_save_load(tmp_path):
    x = np.random.default_rng(5).normal(size=(10, 64)).astype(np.float32)
    q = LUTQuantizer(64, bits=4, group_size=16).train(x)
    assert q.code_size_bits == 256 and q.codebook_bits == 32 * 10 * 4 * 16 and q.rows == 10
    q.save(tmp_path / "t.safetensors")
    q2 = VQBase.load(tmp_path / "t.safetensors")
    assert type(q2) is LUTQuantizer and q2.group_size == 16 and q2.rows == 10
    np.testing.assert_array_equal(q2.encode(x), q.encode(x))
    np.testing.assert_array_equal(q2.reconstruct(x), q.reconstruct(x))


def test_bad_input():
    x = np.random.default_rng(6).normal(size=(10, 64)).astype(np.float32)
    q = LUTQuantizer(64, bits=2).train(x)
    with pytest.raises(ValueError, match="9 rows; the tables were trained for a matrix of 10"):
        q.encode(x[:9])
    with pytest.raises(ValueError, match="codes has 3 rows"):
        q.decode(np.zeros((3, 64), dtype=np.int64))
    with pytest.raises(ValueError, match="out of range"):
        q.decode(np.full((10, 64), 4))
    with pytest.raises(ValueError, match="does not divide"):
        LUTQuantizer(64, group_size=24)
    with pytest.raises(ValueError, match="bits"):
        LUTQuantizer(64, bits=9)
    with pytest.raises(ValueError, match="group_size"):
        LUTQuantizer(64, group_size=0)
    with pytest.raises(ValueError, match="weights"):
        LUTQuantizer(64).train(x, weights=-np.ones_like(x))
    with pytest.raises(ValueError, match="weights"):
        LUTQuantizer(64).train(x, weights=np.ones((5, 64)))
    with pytest.raises(ValueError, match="weights contains NaN"):
        LUTQuantizer(64).train(x, weights=np.full_like(x, np.nan))
    with pytest.raises(ValueError, match="k must be"):
        weighted_kmeans_1d(x, k=0)
