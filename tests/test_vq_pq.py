"""qkern.vq.ProductQuantizer and VectorQuantizer against independent references: ADC search
against brute-force squared distances to the decoded vectors (numpy), encode against the
brute-force nearest sub-centroid, PQ trained with scikit-learn's KMeans per sub-space (and
FAISS's ProductQuantizer when installed), and the input checks."""

from __future__ import annotations

import numpy as np
import pytest

from isas import params, use
from qkern.vq import ProductQuantizer, VectorQuantizer, VQBase


def sqdist(a, b):
    return ((a[:, None, :].astype(np.float64) - b[None].astype(np.float64)) ** 2).sum(-1)


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")  # a test dependency of the repo
    return datasets.load_digits().data.astype(np.float32)


@pytest.mark.parametrize("isa", params())
@pytest.mark.parametrize("nbits", [4, 9])
def test_adc_search_is_brute_force_on_decoded(isa, nbits, rng):
    use(isa)
    x = rng.standard_normal((1200, 24)).astype(np.float32)
    pq = ProductQuantizer(24, m=6, nbits=nbits, n_iter=4).train(x[: max(600, 1 << nbits)])
    codes = pq.encode(x)
    q = rng.standard_normal((7, 24)).astype(np.float32)
    D, Ix = pq.search(q, codes, k=10)
    full = sqdist(q, pq.decode(codes))
    np.testing.assert_allclose(D, np.take_along_axis(full, Ix, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(D, np.sort(full, axis=1)[:, :10], rtol=1e-4, atol=1e-5)
    assert D.dtype == np.float32 and Ix.dtype == np.int64 and (np.diff(D, axis=1) >= 0).all()
    # the whole distance row through k = n
    D_all, I_all = pq.search(q, codes, k=len(x))
    np.testing.assert_allclose(np.take_along_axis(full, I_all, 1), D_all, rtol=1e-4, atol=1e-5)


def test_encode_is_the_nearest_sub_centroid(rng):
    x = rng.standard_normal((500, 12)).astype(np.float32)
    pq = ProductQuantizer(12, m=3, nbits=5, n_iter=5).train(x)
    codes = pq.encode(x)
    assert codes.shape == (500, 3) and codes.dtype == np.int64 and pq.code_size_bits == 15
    for j in range(3):
        D = sqdist(x[:, 4 * j: 4 * j + 4], pq.codebooks[j])
        assert (D[np.arange(500), codes[:, j]] <= D.min(1) * (1 + 1e-5) + 1e-6).all()
    np.testing.assert_array_equal(
        pq.decode(codes), np.concatenate([pq.codebooks[j][codes[:, j]] for j in range(3)], 1))


def test_mse_decreases_with_nbits(rng):
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    mse = [ProductQuantizer(16, m=4, nbits=b, n_iter=8).train(x).mse(x) for b in (1, 2, 4, 6)]
    assert all(a > b for a, b in zip(mse, mse[1:])), mse


def sklearn_pq_mse(x, m, nbits, seed=0):
    cluster = pytest.importorskip("sklearn.cluster")
    dsub, err = x.shape[1] // m, 0.0
    for j in range(m):
        sub = x[:, j * dsub:(j + 1) * dsub].astype(np.float64)
        km = cluster.KMeans(1 << nbits, n_init=1, max_iter=25, random_state=seed + j).fit(sub)
        err += km.inertia_
    return err / len(x)


@pytest.mark.parametrize("nbits", [5, 8])
def test_pq_mse_close_to_sklearn_kmeans_pq(digits, nbits):
    ours = ProductQuantizer(64, m=8, nbits=nbits).train(digits).mse(digits)
    ref = sklearn_pq_mse(digits, 8, nbits)
    assert ours <= ref * 1.05, (ours, ref)


def test_pq_mse_close_to_faiss(digits):
    import faiss  # a test dependency (Makefile): the peer PQ is compared with
    ref = faiss.ProductQuantizer(64, 8, 8)
    ref.train(digits)
    rec = ref.decode(ref.compute_codes(digits))
    ref_mse = float(((rec - digits) ** 2).sum(1).mean())
    ours = ProductQuantizer(64, m=8, nbits=8).train(digits).mse(digits)
    assert ours <= ref_mse * 1.05, (ours, ref_mse)


def test_code_checks(rng):
    x = rng.standard_normal((300, 8)).astype(np.float32)
    pq = ProductQuantizer(8, m=2, nbits=3, n_iter=2).train(x)
    with pytest.raises(ValueError, match="column 1 must lie in \\[0, 8\\)"):
        pq.decode(np.array([[0, 8]]))
    with pytest.raises(ValueError, match="column 0"):
        pq.search(x[:2], np.array([[-1, 0]]), k=1)
    with pytest.raises(ValueError, match="shape \\(n, 2\\)"):
        pq.decode(np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="shape \\(n, 2\\)"):
        pq.search(x[:2], np.zeros((3, 4), dtype=np.uint8), k=1)
    with pytest.raises(ValueError, match="k must be an int in 1..3"):
        pq.search(x[:2], np.zeros((3, 2), dtype=np.uint8), k=4)
    with pytest.raises(ValueError, match="queries has dimension 7"):
        pq.search(np.ones((1, 7)), np.zeros((3, 2), dtype=np.uint8), k=1)


def test_bad_construction(rng):
    with pytest.raises(ValueError, match="d = 10 is not divisible by m = 3"):
        ProductQuantizer(10, m=3)
    for nbits in (0, 17, 2.0):
        with pytest.raises(ValueError, match="nbits must be an int in 1..16"):
            ProductQuantizer(8, m=2, nbits=nbits)
    with pytest.raises(ValueError, match="100 training vectors for 2\\^nbits = 256"):
        ProductQuantizer(8, m=2, nbits=8).train(rng.standard_normal((100, 8)))
    with pytest.raises(ValueError, match="dim must be 2, 4 or 8"):
        VectorQuantizer(12, dim=3)
    with pytest.raises(ValueError, match="d = 6 is not divisible by dim = 4"):
        VectorQuantizer(6, dim=4)


def test_save_load_roundtrip(rng, tmp_path):
    x = rng.standard_normal((400, 8)).astype(np.float32)
    for q in (ProductQuantizer(8, m=4, nbits=4, n_iter=3), VectorQuantizer(8, 4, 5, n_iter=3)):
        q.train(x)
        q.save(tmp_path / f"{q.kind}.safetensors")
        back = VQBase.load(tmp_path / f"{q.kind}.safetensors")
        assert type(back) is type(q) and back.config() == q.config()
        np.testing.assert_array_equal(back.encode(x), q.encode(x))


@pytest.mark.parametrize("dim", [2, 4, 8])
def test_vector_quantizer_blocks(dim, rng):
    x = rng.standard_normal((500, 16)).astype(np.float32)
    vq = VectorQuantizer(16, dim=dim, nbits=5, n_iter=5).train(x)
    codes = vq.encode(x)
    assert codes.shape == (500, 16 // dim) and vq.code_size_bits == 16 // dim * 5
    blocks = x.reshape(-1, dim)
    D = sqdist(blocks, vq.codebook)
    c = codes.reshape(-1)
    assert (D[np.arange(len(c)), c] <= D.min(1) * (1 + 1e-5) + 1e-6).all()
    np.testing.assert_array_equal(vq.decode(codes), vq.codebook[c].reshape(500, 16))


def test_vector_quantizer_mse_decreases_with_nbits(rng):
    x = rng.standard_normal((800, 8)).astype(np.float32)
    mse = [VectorQuantizer(8, dim=2, nbits=b, n_iter=8).train(x).mse(x) for b in (1, 3, 5, 7)]
    assert all(a > b for a, b in zip(mse, mse[1:])), mse
