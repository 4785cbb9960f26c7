"""qkern.vq.KMeans against independent references: scikit-learn's KMeans (Lloyd) from the
same initial centroids, numpy brute-force nearest centroids, known blob centres; the Lloyd
invariant (the objective never increases) and the input checks."""

from __future__ import annotations

import numpy as np
import pytest

from qkern.vq import KMeans, VQBase

sklearn_cluster = pytest.importorskip("sklearn.cluster")  # a test dependency of the repo


def objective(x, c, w=None):
    D = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    m = D.min(1)
    return float(m.sum() if w is None else (m * w).sum())


def blobs(rng, centres, n_each, sd=0.2):
    return np.concatenate([rng.normal(c, sd, (n_each, len(c))) for c in centres]).astype(
        np.float32)


@pytest.mark.parametrize("init", ["k-means++", "random"])
@pytest.mark.parametrize("weighted", [False, True])
def test_objective_never_increases(rng, init, weighted):
    x = rng.standard_normal((3000, 6)).astype(np.float32)
    w = rng.uniform(0, 3, 3000) if weighted else None
    km = KMeans(6, 40, n_iter=30, init=init, tol=0).train(x, weights=w)
    h = np.array(km.objective_history)
    assert 5 < len(h) <= 30  # tol = 0 stops only when an iteration gains nothing
    assert (np.diff(h) <= 1e-6 * h[:-1]).all(), h
    assert h[-1] < 0.9 * h[0]
    # the history is the objective of each iteration's assignment: the last one's centroids
    # are one update further, never worse
    assert objective(x, km.centroids, w) <= h[-1] * (1 + 1e-6)


def test_finds_well_separated_blobs(rng):
    centres = rng.uniform(-20, 20, (6, 5))
    x = blobs(rng, centres, 200)
    km = KMeans(5, 6, seed=3).train(x)
    D = ((km.centroids[:, None, :] - centres[None]) ** 2).sum(-1)
    match = D.argmin(1)
    assert sorted(match.tolist()) == list(range(6))  # one centroid per blob
    assert np.sqrt(D.min(1)).max() < 0.1


def test_encode_is_the_brute_force_nearest_centroid(rng):
    x = rng.standard_normal((2000, 12)).astype(np.float32)
    km = KMeans(12, 50, n_iter=5).train(x)
    codes = km.encode(x)
    assert codes.shape == (2000, 1) and codes.dtype == np.int64
    D = ((x[:, None, :].astype(np.float64) - km.centroids[None]) ** 2).sum(-1)
    got = D[np.arange(2000), codes[:, 0]]
    assert (got <= D.min(1) * (1 + 1e-5) + 1e-6).all()
    np.testing.assert_array_equal(km.decode(codes), km.centroids[codes[:, 0]])


@pytest.mark.parametrize("weighted", [False, True])
def test_matches_sklearn_from_the_same_init(rng, weighted):
    centres = rng.uniform(-3, 3, (12, 8))
    x = (blobs(rng, centres, 150, sd=1.0) + rng.standard_normal((1800, 8)) * 0.5).astype(
        np.float32)
    w = rng.uniform(0.1, 2.0, len(x)) if weighted else None
    km = KMeans(8, 24, n_iter=20, tol=0, seed=5).train(x, weights=w)
    sk = sklearn_cluster.KMeans(24, init=km.init_centroids.astype(np.float64), n_init=1,
                                max_iter=20, tol=0, algorithm="lloyd")
    sk.fit(x.astype(np.float64), sample_weight=w)
    ours, theirs = objective(x, km.centroids, w), objective(x, sk.cluster_centers_, w)
    assert abs(ours - theirs) <= 0.03 * theirs, (ours, theirs)
    assert ours < objective(x, km.init_centroids, w)


def test_weights_act_as_repeats(rng):
    """Integer weights give the same means as repeating the points (same init, same path)."""
    x = rng.standard_normal((400, 3)).astype(np.float32)
    w = rng.integers(1, 4, 400)
    a = KMeans(3, 5, n_iter=10, tol=0, init="random", seed=1).train(x, weights=w)
    ref = sklearn_cluster.KMeans(5, init=a.init_centroids.astype(np.float64), n_init=1,
                                 max_iter=10, tol=0, algorithm="lloyd")
    ref.fit(np.repeat(x, w, axis=0).astype(np.float64))
    np.testing.assert_allclose(np.sort(a.centroids, axis=0), np.sort(ref.cluster_centers_,
                               axis=0), atol=1e-4)


def test_empty_clusters_are_split(rng):
    """Duplicated points make a random init start with equal centroids: all but one of each
    group are empty after the first assignment; the split repairs them."""
    a = rng.normal(0, 0.01, (4, 2))
    x = np.concatenate([np.repeat(a, 50, axis=0) + rng.normal(0, 0.05, (200, 2)),
                        np.repeat(a + 5, 50, axis=0) + rng.normal(0, 0.05, (200, 2))])
    x[:100] = x[0]  # 100 identical points
    km = KMeans(2, 6, n_iter=15, init="random", seed=0, tol=0).train(x.astype(np.float32))
    counts = np.bincount(km.encode(x)[:, 0], minlength=6)
    assert (counts > 0).all(), counts
    assert len(np.unique(km.centroids, axis=0)) == 6


def test_subsample_when_large(rng):
    x = rng.standard_normal((5000, 4)).astype(np.float32)
    km = KMeans(4, 8, n_iter=3, max_points_per_centroid=20).train(x)
    assert km.centroids.shape == (8, 4)
    # the objective is measured on the 160-point subsample
    assert km.objective_history[0] < objective(x, km.init_centroids) / 10


def test_save_load_roundtrip(rng, tmp_path):
    x = rng.standard_normal((300, 5)).astype(np.float32)
    km = KMeans(5, 7, n_iter=4).train(x)
    km.save(tmp_path / "km.safetensors")
    back = VQBase.load(tmp_path / "km.safetensors")
    assert isinstance(back, KMeans) and back.k == 7
    np.testing.assert_array_equal(back.encode(x), km.encode(x))
    assert km.code_size_bits == 3 and km.codebook_bits == 7 * 5 * 32


def test_deterministic_for_a_seed(rng):
    x = rng.standard_normal((500, 4)).astype(np.float32)
    a, b = KMeans(4, 9, seed=7).train(x), KMeans(4, 9, seed=7).train(x)
    np.testing.assert_array_equal(a.centroids, b.centroids)


@pytest.mark.parametrize("kw, msg", [
    ({"k": 0}, "k must be an int >= 1"), ({"init": "kmeans"}, "init must be"),
    ({"tol": -1.0}, "tol must be"), ({"n_iter": 2.5}, "n_iter must be"),
])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        KMeans(**{"d": 3, "k": 2, **kw})


def test_bad_training_input(rng):
    x = rng.standard_normal((10, 3))
    with pytest.raises(ValueError, match="10 training vectors for k = 11"):
        KMeans(3, 11).train(x)
    with pytest.raises(ValueError, match="weights must have shape \\(10,\\)"):
        KMeans(3, 2).train(x, weights=np.ones(9))
    with pytest.raises(ValueError, match=">= 0"):
        KMeans(3, 2).train(x, weights=-np.ones(10))
    with pytest.raises(ValueError, match="1 positive weights for k = 2"):
        KMeans(3, 2).train(x, weights=np.eye(10)[0])
    with pytest.raises(ValueError, match="dimension 4, the quantizer's is 3"):
        KMeans(3, 2).train(np.ones((10, 4)))
    km = KMeans(3, 2).train(x)
    with pytest.raises(ValueError, match="out of range"):
        km.decode(np.array([[2]]))
