"""qkern.vq.OPQ against independent references: the definition of an orthogonal matrix, the
plain PQ on correlated data (Gaussian with a random covariance, scikit-learn's digits), FAISS's
OPQMatrix + ProductQuantizer (faiss-cpu), numpy brute-force search over the decoded vectors,
and a Procrustes problem with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from qkern.vq import OPQ, ProductQuantizer, ResidualQuantizer, VQBase
from qkern.vq.opq import procrustes


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    return load_digits().data.astype(np.float32)


@pytest.fixture(scope="module")
def gauss():
    g = np.random.default_rng(7)
    return (g.standard_normal((3000, 32)) @ g.standard_normal((32, 32))).astype(np.float32)


@pytest.mark.parametrize("init", ["identity", "random"])
def test_rotation_is_orthogonal(gauss, init):
    r = OPQ(32, 8, 4, n_iter=10, init=init).train(gauss).rotation.astype(np.float64)
    np.testing.assert_allclose(r @ r.T, np.eye(32), atol=1e-5)
    np.testing.assert_allclose(r.T @ r, np.eye(32), atol=1e-5)


def test_procrustes_recovers_a_rotation(rng):
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    x = rng.standard_normal((50, 6))
    np.testing.assert_allclose(procrustes(x, x @ q), q, atol=1e-5)


@pytest.mark.parametrize("m, nbits", [(8, 4), (16, 4)])
def test_opq_beats_pq_on_correlated_data(gauss, digits, m, nbits):
    for x, factor in ((gauss, 0.8), (digits, 1.0)):
        d = x.shape[1]
        opq = OPQ(d, m, nbits).train(x).mse(x)
        pq = ProductQuantizer(d, m, nbits).train(x).mse(x)
        assert opq <= factor * pq, (d, opq, pq)


@pytest.mark.parametrize("m, nbits, init, warm", [(8, 4, "identity", True),
                                                  (8, 6, "random", True),
                                                  (16, 4, "identity", True),
                                                  (8, 4, "identity", False),
                                                  (8, 6, "random", False)])
def test_opq_matches_faiss(digits, m, nbits, init, warm):
    faiss = pytest.importorskip("faiss")
    ours = OPQ(64, m, nbits, init=init, warm_start=warm).train(digits).mse(digits)
    mat = faiss.OPQMatrix(64, m)
    mat.pq = faiss.ProductQuantizer(64, m, nbits)  # its inner PQ at our bits (default 8)
    mat.verbose = False
    mat.train(digits)
    xr = mat.apply(digits)
    pq = faiss.ProductQuantizer(64, m, nbits)
    pq.train(xr)
    rec = mat.reverse_transform(pq.decode(pq.compute_codes(xr)))
    theirs = float(((rec - digits) ** 2).sum(1).mean())
    assert ours <= 1.05 * theirs, (ours, theirs)


def test_encode_decode_search_definitions(gauss, rng):
    x = gauss[:1500]
    q = OPQ(32, 4, 5, n_iter=5).train(x)
    codes = q.encode(x)
    y = x.astype(np.float64) @ q.rotation  # nearest sub-centroid of each rotated sub-vector
    books = q.pq.codebooks.astype(np.float64)
    for j in range(4):
        sub = y[:, j * 8:(j + 1) * 8]
        d2 = ((sub[:, None, :] - books[j][None]) ** 2).sum(-1)
        assert (codes[:, j] == d2.argmin(1)).mean() > 0.99
    recon = books[np.arange(4)[None, :], codes].reshape(-1, 32) @ q.rotation.T.astype(np.float64)
    np.testing.assert_allclose(q.decode(codes), recon, rtol=1e-4, atol=1e-4)
    queries = rng.standard_normal((5, 32)).astype(np.float32) * 3
    D, idx = q.search(queries, codes, k=10)
    full = ((queries[:, None, :].astype(np.float64) - recon[None]) ** 2).sum(-1)
    np.testing.assert_allclose(D, np.sort(full, axis=1)[:, :10], rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(np.take_along_axis(full, idx, 1), D, rtol=1e-3, atol=1e-2)


def test_errors_and_save_load(tmp_path, rng):
    x = rng.standard_normal((300, 8)).astype(np.float32)
    for kw, what in (({"m": 3}, "divisible"), ({"nbits": 0}, "nbits"), ({"n_iter": -1}, "n_iter"),
                     ({"init": "pca"}, "init"), ({"lloyd_steps": 0}, "lloyd_steps")):
        with pytest.raises(ValueError, match=what):
            OPQ(8, **{"m": 2, **kw})
    q = OPQ(8, 2, 4, n_iter=3).train(x)
    with pytest.raises(ValueError, match="out of range"):
        q.decode(np.array([[0, 16]]))
    with pytest.raises(ValueError, match="shape"):
        q.decode(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="dimension"):
        q.search(np.zeros((1, 7)), q.encode(x), 3)
    with pytest.raises(ValueError, match="k must be"):
        q.search(x[:1], q.encode(x[:5]), 6)
    q.save(tmp_path / "opq.safetensors")
    back = VQBase.load(tmp_path / "opq.safetensors")
    assert isinstance(back, OPQ) and back.config() == q.config()
    np.testing.assert_array_equal(back.rotation, q.rotation)
    np.testing.assert_array_equal(back.encode(x), q.encode(x))
    np.testing.assert_array_equal(back.decode(q.encode(x)), q.decode(q.encode(x)))
    with pytest.raises(ValueError, match="not a ResidualQuantizer"):  # another kind's file
        ResidualQuantizer.load(tmp_path / "opq.safetensors")


def test_cold_restarts_rotate_and_beat_pq(gauss):
    """warm_start=False (FAISS's OPQMatrix: a fresh PQ each outer iteration): an orthogonal
    rotation, a lower error than the plain PQ on correlated data, another path than warm."""
    cold = OPQ(32, 8, 4, n_iter=8, warm_start=False).train(gauss)
    r = cold.rotation.astype(np.float64)
    np.testing.assert_allclose(r @ r.T, np.eye(32), atol=1e-5)
    assert cold.mse(gauss) <= 0.8 * ProductQuantizer(32, 8, 4).train(gauss).mse(gauss)
    warm = OPQ(32, 8, 4, n_iter=8).train(gauss)
    assert not np.array_equal(cold.rotation, warm.rotation)
    assert cold.config()["warm_start"] is False
    with pytest.raises(TypeError, match="warm_start"):
        OPQ(32, 8, 4, warm_start=1)
