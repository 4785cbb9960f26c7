"""qkern.vq's residual, additive and two-level quantizers and the C++ top-k kernel, against
independent references: numpy brute force (sorted float64 distance matrices, greedy and
exhaustive residual encodings written from the definition, numpy least squares) and FAISS's
ResidualQuantizer (faiss-cpu) on scikit-learn's digits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import qkern
from isas import params, use
from qkern.vq import AdditiveQuantizer, KMeans, MultiLevelVQ, ResidualQuantizer, VQBase
from qkern.vq.rq import lsq_codebooks
from qkern.vq.search import smallest, topk


def brute(x, c):
    return ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    return load_digits().data.astype(np.float32)


# ---- the top-k kernel ------------------------------------------------------------------------
@pytest.mark.parametrize("isa", params())
def test_topk_matches_brute_force(isa, rng):
    use(isa)
    for n, d, k, kk in [(1, 1, 1, 1), (7, 2, 5, 5), (50, 3, 16, 4), (61, 8, 17, 17),
                        (200, 17, 33, 3), (29, 5, 300, 12), (13, 64, 256, 8)]:
        x = rng.standard_normal((n, d)).astype(np.float32)
        c = rng.standard_normal((k, d)).astype(np.float32)
        idx, dist = topk(x, c, kk)
        D = brute(x, c)
        ref = np.argsort(D, axis=1, kind="stable")[:, :kk]
        assert idx.shape == dist.shape == (n, kk) and idx.dtype == np.int64
        assert (idx == ref).mean() > 0.99  # near-ties may swap within the float error
        scale = (x.astype(np.float64) ** 2).sum(1).max() + (c.astype(np.float64) ** 2).sum(1).max()
        np.testing.assert_allclose(dist, np.take_along_axis(D, ref, 1), atol=1e-5 * scale,
                                   rtol=1e-4)
        assert (np.diff(dist, axis=1) >= 0).all()  # ascending
        for row in idx:  # distinct centroids
            assert len(set(row.tolist())) == kk


@pytest.mark.parametrize("isa", params())
def test_topk_ties_take_the_lower_index(isa, rng):
    use(isa)
    base = rng.standard_normal((5, 6)).astype(np.float32)
    c = np.concatenate([base, base, base])  # centroid j == j + 5 == j + 10
    idx, dist = topk(base, c, 3)
    np.testing.assert_array_equal(idx, np.arange(5)[:, None] + np.array([0, 5, 10])[None, :])
    assert (dist[:, 0] == dist[:, 2]).all()


def test_topk_isas_and_threads_agree_bitwise(rng):
    x = rng.standard_normal((997, 24)).astype(np.float32)
    c = rng.standard_normal((70, 24)).astype(np.float32)
    qkern.set_isa("scalar")
    want = topk(x, c, 6)
    for isa in qkern.available_isas():
        qkern.set_isa(isa)
        for threads in (1, 2, 3):
            qkern.set_num_threads(threads)
            got = topk(x, c, 6)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


def test_topk_errors(rng):
    c = rng.standard_normal((4, 3)).astype(np.float32)
    for k in (0, 5, 1.5, True):
        with pytest.raises(ValueError, match="k must be"):
            topk(np.zeros((2, 3)), c, k)
    with pytest.raises(ValueError, match="dimension"):
        topk(np.zeros((2, 4)), c, 1)


def test_smallest_is_a_stable_partial_argsort(rng):
    for n, length, k in [(1, 1, 1), (40, 7, 3), (300, 64, 16), (5, 1000, 1000)]:
        v = rng.integers(0, 9, (n, length)).astype(np.float32)  # many ties
        want = np.argsort(v, axis=1, kind="stable")[:, :k]
        for threads in (1, 3):
            qkern.set_num_threads(threads)
            np.testing.assert_array_equal(smallest(v, k), want)
    with pytest.raises(ValueError, match="k must be"):
        smallest(np.zeros((2, 3)), 4)
    with pytest.raises(ValueError, match="NaN"):
        smallest(np.array([[np.nan, 1.0]]), 1)


# ---- residual quantization ---------------------------------------------------------------
def test_rq_mse_decreases_with_stages(rng):
    x = (rng.standard_normal((1500, 8)) @ rng.standard_normal((8, 8))).astype(np.float32)
    mses = [ResidualQuantizer(8, m, nbits=4, beam_size=2).train(x).mse(x) for m in (1, 2, 3, 4)]
    assert all(b < a for a, b in zip(mses, mses[1:])), mses


def test_rq_mse_decreases_with_beam(digits):
    rq = ResidualQuantizer(64, m=4, nbits=5).train(digits)
    mses = []
    for beam in (1, 2, 4, 8, 16):
        rq.beam_size = beam  # the same codebooks, a wider search
        mses.append(rq.mse(digits))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(mses, mses[1:])), mses
    assert mses[-1] < mses[0] * 0.99


def greedy_reference(x, books):
    res, codes = x.astype(np.float64), []
    for b in books:
        c = brute(res, b).argmin(1)
        codes.append(c)
        res = res - b[c]
    return np.stack(codes, 1)


def test_rq_beam_one_is_the_greedy_encoding(rng):
    x = rng.standard_normal((400, 6)).astype(np.float32)
    rq = ResidualQuantizer(6, m=3, nbits=3).train(x)
    assert (rq.encode(x) == greedy_reference(x, rq.codebooks)).mean() > 0.99


def test_full_beam_is_exhaustive_search(rng):
    m, nbits, d = 3, 2, 4
    k = 1 << nbits
    x = rng.standard_normal((300, d)).astype(np.float32)
    rq = ResidualQuantizer(d, m, nbits, beam_size=k ** m).train(x)
    combos = np.array(list(itertools.product(range(k), repeat=m)))  # (k^m, m)
    recon = rq.codebooks.astype(np.float64)[np.arange(m)[None, :], combos].sum(1)
    D = brute(x, recon)
    best = D.argmin(1)
    codes = rq.encode(x)
    got = D[np.arange(len(x)), [int(np.flatnonzero((combos == c).all(1))[0]) for c in codes]]
    np.testing.assert_allclose(got, D.min(1), rtol=1e-5, atol=1e-5)
    assert (codes == combos[best]).all(1).mean() > 0.98
    greedy = ResidualQuantizer(d, m, nbits, beam_size=1)
    greedy.codebooks, greedy.is_trained = rq.codebooks, True
    assert rq.mse(x) < greedy.mse(x)  # the exhaustive search beats the greedy one here


@pytest.mark.parametrize("m, nbits, beam", [(4, 6, 1), (4, 6, 4), (8, 4, 8)])
def test_rq_matches_faiss(digits, m, nbits, beam):
    faiss = pytest.importorskip("faiss")
    ours = ResidualQuantizer(64, m, nbits, beam_size=beam).train(digits).mse(digits)
    f = faiss.ResidualQuantizer(64, m, nbits)
    f.max_beam_size = beam
    f.train(digits)
    theirs = float(((f.decode(f.compute_codes(digits)) - digits) ** 2).sum(1).mean())
    assert ours <= 1.05 * theirs, (ours, theirs)


# ---- additive quantization ---------------------------------------------------------------
def test_lsq_update_is_the_least_squares_solution(rng):
    n, m, k, d = 300, 3, 4, 5
    x = rng.standard_normal((n, d)).astype(np.float32)
    codes = rng.integers(0, k, (n, m))
    old = rng.standard_normal((m, k, d)).astype(np.float32)
    new = lsq_codebooks(x, codes, old, ridge=1e-9)
    B = np.zeros((n, m * k))
    B[np.arange(n)[:, None], codes + np.arange(m) * k] = 1
    sol = np.linalg.lstsq(B, x.astype(np.float64), rcond=None)[0]
    err = ((x - B @ new.reshape(m * k, d)) ** 2).sum()
    best = ((x - B @ sol) ** 2).sum()
    assert err <= best * (1 + 1e-5)


@pytest.mark.parametrize("m, nbits, beam", [(4, 6, 1), (4, 5, 4)])
def test_aq_not_worse_than_rq(digits, m, nbits, beam):
    rq = ResidualQuantizer(64, m, nbits, beam_size=beam).train(digits)
    aq = AdditiveQuantizer(64, m, nbits, beam_size=beam).train(digits)
    assert aq.mse(digits) <= rq.mse(digits) * (1 + 1e-6)
    assert aq.mse(digits) < 0.99 * rq.mse(digits)  # the joint update does help here
    np.testing.assert_allclose(aq.rq_mse, rq.mse(digits), rtol=1e-4)


# ---- two levels ------------------------------------------------------------------------------
@pytest.mark.parametrize("fine", ["pq", "rq"])
def test_mlvq(rng, fine):
    x = (rng.standard_normal((1200, 8)) @ rng.standard_normal((8, 8))).astype(np.float32)
    q = MultiLevelVQ(8, coarse_bits=4, m=2, nbits=4, fine=fine).train(x)
    codes = q.encode(x)
    assert codes.shape == (1200, 3) and q.code_size_bits == 12
    assert (codes[:, 0] == brute(x, q.coarse).argmin(1)).mean() > 0.99
    res = x - q.coarse[codes[:, 0]]
    np.testing.assert_allclose(q.decode(codes), q.coarse[codes[:, 0]] + q.fine.decode(codes[:, 1:]),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(codes[:, 1:], q.fine.encode(res))
    coarse_only = KMeans(8, 16).train(x).mse(x)
    assert q.mse(x) < 0.5 * coarse_only


# ---- errors, files ---------------------------------------------------------------------------
def test_errors(rng):
    x = rng.standard_normal((100, 4)).astype(np.float32)
    for bad in ({"m": 0}, {"nbits": 0}, {"nbits": 17}, {"beam_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ResidualQuantizer(4, **{"m": 2, **bad})
    with pytest.raises(ValueError, match="need >= 256"):
        ResidualQuantizer(4, 2).train(x)
    with pytest.raises(ValueError, match="ridge"):
        AdditiveQuantizer(4, 2, 3, ridge=0)
    with pytest.raises(ValueError, match="fine"):
        MultiLevelVQ(4, 2, 2, 2, fine="ivf")
    with pytest.raises(ValueError, match="divisible"):
        MultiLevelVQ(6, 2, 4, 2)
    rq = ResidualQuantizer(4, 2, 3).train(x)
    with pytest.raises(ValueError, match="out of range"):
        rq.decode(np.array([[0, 8]]))
    with pytest.raises(ValueError, match="shape"):
        rq.decode(np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="dimension"):
        rq.encode(np.zeros((2, 5)))
    mq = MultiLevelVQ(4, 2, 2, 3).train(x)
    with pytest.raises(ValueError, match="column 0"):
        mq.decode(np.array([[4, 0, 0]]))


@pytest.mark.parametrize("make", [
    lambda: ResidualQuantizer(4, 2, 3, beam_size=3),
    lambda: AdditiveQuantizer(4, 2, 3, beam_size=2, refine_rounds=2),
    lambda: MultiLevelVQ(4, 2, 2, 3),
    lambda: MultiLevelVQ(4, 2, 2, 3, fine="rq", beam_size=2),
])
def test_save_load(tmp_path, rng, make):
    x = rng.standard_normal((200, 4)).astype(np.float32)
    q = make().train(x)
    q.save(tmp_path / "q.safetensors")
    back = VQBase.load(tmp_path / "q.safetensors")
    assert type(back) is type(q) and back.config() == q.config()
    np.testing.assert_array_equal(back.encode(x), q.encode(x))
    np.testing.assert_array_equal(back.decode(q.encode(x)), q.decode(q.encode(x)))
