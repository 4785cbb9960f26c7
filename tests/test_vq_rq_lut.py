"""The look-up-table beam search of qkern's residual quantizer (qkern.vq.search.rq_beam_encode,
rq_cross_table; ResidualQuantizer.encode) against independent references: a numpy beam search
written from the definition (float64 residuals, candidates sorted by exact residual norm, ties
by parent then codeword), numpy cross products, and the residual-forming search the training
uses (qkern.vq.rq.beam_search with lut=False: another code path, the codes it gave before)."""

from __future__ import annotations

import numpy as np
import pytest

import qkern
from isas import params, use
from qkern.vq import ResidualQuantizer, rq, search
from qkern.vq.search import rq_beam_encode, rq_cross_table


def beam_reference(x, books, beam):
    """Beam search from the definition: float64 residuals, stable sort of all candidates."""
    n = x.shape[0]
    m, k, _ = books.shape
    b64 = books.astype(np.float64)
    res = x.astype(np.float64)[:, None, :]  # (n, B, d)
    codes = np.zeros((n, 1, 0), dtype=np.int64)
    for s in range(m):
        nb = res.shape[1]
        cand = res[:, :, None, :] - b64[s][None, None, :, :]  # (n, B, K, d)
        dist = (cand ** 2).sum(-1).reshape(n, nb * k)
        keep = min(beam, nb * k)
        sel = np.argsort(dist, axis=1, kind="stable")[:, :keep]
        par, cw = sel // k, sel % k
        res = cand.reshape(n, nb * k, -1)[np.arange(n)[:, None], sel]
        codes = np.concatenate([np.take_along_axis(codes, par[:, :, None], 1),
                                cw[:, :, None]], axis=2)
    return codes[:, 0, :]


def sq_err(x, books, codes):
    rec = sum(books[s].astype(np.float64)[codes[:, s]] for s in range(books.shape[0]))
    return ((x.astype(np.float64) - rec) ** 2).sum(1)


def problem(rng, n, m, k, d, scale=0.5):
    books = (rng.standard_normal((m, k, d)) * scale ** np.arange(m)[:, None, None])
    x = rng.standard_normal((n, d))
    return x.astype(np.float32), books.astype(np.float32)


@pytest.mark.parametrize("isa", params())
def test_lut_beam_matches_the_definition(isa, rng):
    use(isa)
    for n, m, k, d, beam in [(50, 1, 1, 1, 1), (40, 1, 7, 3, 3), (120, 3, 4, 5, 2),
                             (200, 4, 16, 8, 5), (60, 2, 3, 2, 20), (150, 5, 33, 17, 8),
                             (100, 3, 64, 40, 1)]:
        x, books = problem(rng, n, m, k, d)
        got = rq_beam_encode(x, books, beam)
        want = beam_reference(x, books, beam)
        assert got.shape == (n, m) and got.dtype == np.int64
        assert (got == want).all(1).mean() >= 0.99, (n, m, k, d, beam)
        e_got, e_want = sq_err(x, books, got), sq_err(x, books, want)
        assert e_got.mean() <= e_want.mean() * (1 + 1e-6) + 1e-9, (n, m, k, d, beam)


def test_exact_ties_take_the_earlier_parent_then_the_lower_codeword():
    # integer data: every value exact in float32; stage 0 ties codewords 0 and 1 (|x - c| = 1),
    # stage 1 ties all four (parent 0, codeword 0 / 1) and (parent 1, codeword 0 / 1) at 0
    x = np.array([[1.0, 0.0]], dtype=np.float32)
    books = np.array([[[0.0, 0.0], [2.0, 0.0]], [[1.0, 0.0], [-1.0, 0.0]]], dtype=np.float32)
    for beam in (1, 2, 4):
        np.testing.assert_array_equal(rq_beam_encode(x, books, beam), [[0, 0]])
        np.testing.assert_array_equal(beam_reference(x, books, beam), [[0, 0]])


def test_same_codes_as_the_residual_search(rng):
    """The codes the residual-forming search gave (beam 1, 5, 8 on random data whose
    codebooks are trained), and its error within float rounding."""
    x = (rng.standard_normal((3000, 24)) @ rng.standard_normal((24, 24))).astype(np.float32)
    q = ResidualQuantizer(24, m=6, nbits=6, n_iter=8).train(x[:1500])
    for beam in (1, 5, 8):
        got = rq_beam_encode(x, q.codebooks, beam)
        old = rq.beam_search(x, q.codebooks, beam, lut=False)
        assert (got == old).all(1).mean() >= 0.999, beam
        e_got, e_old = sq_err(x, q.codebooks, got).mean(), sq_err(x, q.codebooks, old).mean()
        assert abs(e_got - e_old) <= 1e-6 * e_old, (beam, e_got, e_old)


def test_cross_table_is_the_codeword_dot_products(rng):
    m, k, d = 4, 5, 7
    books = rng.standard_normal((m, k, d)).astype(np.float32)
    cross = rq_cross_table(books)
    assert cross.shape == (k * k * m * (m - 1) // 2,) and cross.dtype == np.float32
    b = books.astype(np.float64)
    for s in range(1, m):
        block = cross[k * k * s * (s - 1) // 2: k * k * s * (s + 1) // 2].reshape(s * k, k)
        want = b[:s].reshape(s * k, d) @ b[s].T
        np.testing.assert_allclose(block, want, rtol=1e-5, atol=1e-5)
    assert rq_cross_table(books[:1]).shape == (0,)


@pytest.mark.parametrize("k", [40, 150])  # 150: full SIMD blocks of entries and a tail
@pytest.mark.parametrize("beam", [6, 16, 17])  # AVX-512 keeps lists <= 16 in registers
def test_isas_and_threads_agree_bitwise(rng, k, beam):
    x, books = problem(rng, 777, 5, k, 19)
    qkern.set_isa("scalar")
    qkern.set_num_threads(1)
    want, cross = rq_beam_encode(x, books, beam), rq_cross_table(books)
    for isa in qkern.available_isas():
        qkern.set_isa(isa)
        for threads in (1, 2, 3):
            qkern.set_num_threads(threads)
            np.testing.assert_array_equal(rq_cross_table(books), cross)
            np.testing.assert_array_equal(rq_beam_encode(x, books, beam), want)


def test_large_codebooks_sum_trunks_in_chunks(rng):
    """K = 2600: a block's trunk sums are taken in chunks of 100 rows (1 MiB), so rows of one
    block go through several chunks; the codes still follow the definition and agree bitwise
    across thread counts (other blocks, other chunk boundaries)."""
    x, books = problem(rng, 250, 3, 2600, 4)
    qkern.set_num_threads(1)
    want = rq_beam_encode(x, books, 3)
    assert (want == beam_reference(x, books, 3)).all(1).mean() >= 0.99
    for threads in (2, 3):
        qkern.set_num_threads(threads)
        np.testing.assert_array_equal(rq_beam_encode(x, books, 3), want)


@pytest.mark.parametrize("isa", params())
@pytest.mark.parametrize("beam", [3, 16, 20])
def test_many_exact_ties_follow_the_definition(isa, rng, beam):
    """Small integers: every distance exact in float32 and most of them tied, so the list's
    order (equal values by parent, then codeword) decides nearly every code."""
    use(isa)
    x = rng.integers(-2, 3, (300, 6)).astype(np.float32)
    books = rng.integers(-1, 2, (4, 70, 6)).astype(np.float32)
    np.testing.assert_array_equal(rq_beam_encode(x, books, beam), beam_reference(x, books, beam))


def test_quantizer_caches_tables_per_codebooks(rng, monkeypatch):
    x, books = problem(rng, 300, 3, 16, 6)
    q = ResidualQuantizer(6, m=3, nbits=4, beam_size=4)
    q.codebooks, q.is_trained = books, True
    np.testing.assert_array_equal(q.encode(x), rq_beam_encode(x, books, 4))
    table = q._cross[1]
    q.encode(x[:10])
    assert q._cross[1] is table  # built once
    other = problem(rng, 1, 3, 16, 6)[1]
    q.codebooks = other  # new codebooks: new tables
    np.testing.assert_array_equal(q.encode(x), beam_reference(x, other, 4))
    # codebooks past LUT_MAX_FLOATS search by residuals (the same codes here)
    monkeypatch.setattr(search, "LUT_MAX_FLOATS", 10)
    q2 = ResidualQuantizer(6, m=3, nbits=4, beam_size=4)
    q2.codebooks, q2.is_trained = other, True
    np.testing.assert_array_equal(q2.encode(x), beam_reference(x, other, 4))
    assert q2._cross is None


def test_errors(rng):
    x, books = problem(rng, 5, 3, 4, 2)
    for beam in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="beam must be"):
            rq_beam_encode(x, books, beam)
    with pytest.raises(ValueError, match="cross must be"):
        rq_beam_encode(x, books, 2, np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="cross must be"):
        rq_beam_encode(x, books, 2, rq_cross_table(books).astype(np.float64))
    with pytest.raises(ValueError, match="dimension"):
        rq_beam_encode(np.zeros((2, 3)), books, 2)
    with pytest.raises(ValueError, match="NaN"):
        rq_beam_encode(np.full((1, 2), np.nan), books, 2)
    with pytest.raises(ValueError, match="3 dimensions"):
        rq_cross_table(books[0])


def test_encode_beam_size_is_the_beam_of_encode_alone(rng):
    """ResidualQuantizer(encode_beam_size=b) trains as with beam_size (the same codebooks) and
    encodes with a beam of b: the numpy beam search's codes at b (>= 99 % of rows, the rest
    float-order ties, as above); rebuilt from its config."""
    x, _ = problem(rng, 400, 3, 8, 6)
    plain = ResidualQuantizer(6, m=3, nbits=3, beam_size=2, n_iter=5).train(x)
    wide = ResidualQuantizer(6, m=3, nbits=3, beam_size=2, n_iter=5, encode_beam_size=6).train(x)
    np.testing.assert_array_equal(wide.codebooks, plain.codebooks)
    got = wide.encode(x)
    assert (got == beam_reference(x, wide.codebooks, 6)).all(1).mean() >= 0.99
    assert (plain.encode(x) == beam_reference(x, plain.codebooks, 2)).all(1).mean() >= 0.99
    assert ResidualQuantizer(**wide.config()).encode_beam_size == 6
    assert "encode_beam_size" not in plain.config()
    with pytest.raises(ValueError, match="encode_beam_size"):
        ResidualQuantizer(6, m=3, encode_beam_size=0)

