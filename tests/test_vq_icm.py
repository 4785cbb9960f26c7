"""Local-search encoding of additive codebooks (qkern.vq.icm: ICM / ILS, FAISS's LSQ encoder,
from look-up tables in C++), the additive quantizer that uses it, and progressive-dimension
k-means (FAISS's ProgressiveDimClustering) in the residual quantizer, against independent
references: numpy ICM / ILS written from the definition (each codebook in turn takes the
argmin over its entries of the exact float64 squared error, the lowest entry on ties), numpy
brute force over every single-code change and over every code (exhaustive search), FAISS's
LocalSearchQuantizer, ProgressiveDimClustering and ResidualQuantizer (faiss-cpu) on digits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import qkern
from isas import params, use
from qkern.vq import AdditiveQuantizer, KMeans, ResidualQuantizer, search
from qkern.vq.icm import icm, ils
from qkern.vq.kmeans import progressive_dim_kmeans


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    return load_digits().data.astype(np.float32)


def err64(x, books, codes):
    """Squared errors (n,) in float64, written from the definition."""
    b = books.astype(np.float64)
    rec = sum(b[j][codes[:, j]] for j in range(books.shape[0]))
    return ((x.astype(np.float64) - rec) ** 2).sum(1)


def tiny(rng, n=300, m=3, k=5, d=4):
    x = rng.standard_normal((n, d)).astype(np.float32)
    books = rng.standard_normal((m, k, d)).astype(np.float32)
    return x, books, rng.integers(0, k, (n, m))


def icm_reference(x, books, codes, iters):
    """ICM from the definition: ``iters`` sweeps, each codebook j = 0..m-1 in turn set to the
    argmin over k (first: the lowest k on ties) of the float64 squared error, others fixed."""
    b = books.astype(np.float64)
    x64 = x.astype(np.float64)
    codes = codes.astype(np.int64, copy=True)
    for _ in range(iters):
        for j in range(books.shape[0]):
            others = sum(b[i][codes[:, i]] for i in range(books.shape[0]) if i != j)
            res = x64 - others  # (n, d)
            errs = ((res[:, None, :] - b[j][None]) ** 2).sum(-1)  # (n, K)
            codes[:, j] = errs.argmin(1)
    return codes


def ils_reference(x, books, codes, ils_iters, icm_iters, nperts, rng):
    """ILS from the definition, the perturbations drawn round by round (codebooks, then
    entries), the start kept where ICM does worse, a candidate kept where strictly better."""
    n, (m, k) = x.shape[0], books.shape[:2]
    best = icm_reference(x, books, codes, icm_iters)
    worse = err64(x, books, best) > err64(x, books, codes)
    best[worse] = codes[worse]
    for _ in range(ils_iters):
        which, value = rng.integers(0, m, (n, nperts)), rng.integers(0, k, (n, nperts))
        cand = best.copy()
        for i in range(n):
            for p in range(nperts):
                cand[i, which[i, p]] = value[i, p]
        cand = icm_reference(x, books, cand, icm_iters)
        better = err64(x, books, cand) < err64(x, books, best)
        best[better] = cand[better]
    return best


def integer_problem(rng, n=200, m=3, k=40, d=4):
    """Small integers (float32 arithmetic exact): many exact ties; duplicated codewords."""
    x = rng.integers(-6, 7, (n, d)).astype(np.float32)
    books = rng.integers(-2, 3, (m, k, d)).astype(np.float32)
    books[:, k // 2] = books[:, 1]  # equal entries: the lower one must win
    return x, books, rng.integers(0, k, (n, m))


# ---- ICM ---------------------------------------------------------------------------------
@pytest.mark.parametrize("isa", params())
@pytest.mark.parametrize("k", [5, 40, 64])
def test_icm_equals_the_definition_with_exact_ties(isa, k, rng):
    """Exact arithmetic (integers): the look-up-table sweep's codes are the reference's,
    ties to the lowest entry, on every ISA and thread count; also the search path (codebooks
    past the table limit)."""
    use(isa)
    x, books, start = integer_problem(rng, k=k)
    want = icm_reference(x, books, start, 3)
    for threads in (1, 3):
        qkern.set_num_threads(threads)
        np.testing.assert_array_equal(icm(x, books, start, icm_iters=3), want)


def test_icm_search_path_past_the_table_limit(rng, monkeypatch):
    x, books, start = integer_problem(rng, k=40)
    want = icm_reference(x, books, start, 3)
    monkeypatch.setattr(search, "LUT_MAX_FLOATS", 10)
    np.testing.assert_array_equal(icm(x, books, start, icm_iters=3), want)
    got = ils(x, books, start, 3, 2, 2, np.random.default_rng(4))
    np.testing.assert_array_equal(
        got, ils_reference(x, books, start, 3, 2, 2, np.random.default_rng(4)))


@pytest.mark.parametrize("isa", params())
def test_icm_and_ils_equal_the_definition_on_gaussians(isa, rng):
    """Random floats: the same codes as the float64 reference (no near-ties at this size) and
    squared errors equal within float rounding."""
    use(isa)
    x, books, start = tiny(rng, n=300, m=4, k=48, d=8)
    want = icm_reference(x, books, start, 4)
    got = icm(x, books, start, icm_iters=4)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(err64(x, books, got), err64(x, books, want), rtol=1e-6)
    got = ils(x, books, start, 3, 3, 2, np.random.default_rng(5))
    want = ils_reference(x, books, start, 3, 3, 2, np.random.default_rng(5))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("isa", params())
def test_icm_fixed_point_is_locally_optimal(isa, rng):
    """Run to convergence, no single code change (brute force over all j, k) lowers the
    error of any vector."""
    use(isa)
    x, books, start = tiny(rng)
    codes = icm(x, books, start, icm_iters=100)
    e = err64(x, books, codes)
    scale = (x.astype(np.float64) ** 2).sum(1) + 10
    for j in range(books.shape[0]):
        for k in range(books.shape[1]):
            c = codes.copy()
            c[:, j] = k
            assert (err64(x, books, c) >= e - 1e-5 * scale).all(), (j, k)


def test_icm_sweeps_never_increase_the_error(rng):
    x, books, codes = tiny(rng, n=500, m=4, k=8, d=6)
    e = err64(x, books, codes)
    scale = (x.astype(np.float64) ** 2).sum(1) + 10
    for _ in range(5):
        codes = icm(x, books, codes, icm_iters=1)
        e_new = err64(x, books, codes)
        assert (e_new <= e + 1e-5 * scale).all()
        e = e_new
    assert e.mean() < err64(x, books, tiny(rng, n=500, m=4, k=8, d=6)[2]).mean()


def test_ils_never_worse_than_its_start_and_near_exhaustive(rng):
    x, books, start = tiny(rng, n=400, m=3, k=4, d=5)
    combos = np.array(list(itertools.product(range(4), repeat=3)))
    opt = np.min([err64(x, books, np.repeat(c[None], len(x), 0)) for c in combos], axis=0)
    plain = icm(x, books, start, icm_iters=10)
    codes = ils(x, books, start, ils_iters=16, icm_iters=4, nperts=2,
                rng=np.random.default_rng(0))
    e = err64(x, books, codes)
    assert (e <= err64(x, books, start)).all()
    assert (e >= opt - 1e-4).all()  # sanity: never below the exhaustive optimum
    reached = np.isclose(e, opt, rtol=1e-6, atol=1e-6).mean()
    assert reached > 0.95 and reached > np.isclose(err64(x, books, plain), opt).mean()


@pytest.mark.parametrize("k", [16, 70])
def test_ils_is_deterministic_across_threads_and_isas(rng, k):
    x, books, start = tiny(rng, n=700, m=4, k=k, d=8)
    qkern.set_isa("scalar")
    want = ils(x, books, start, 4, 3, 2, np.random.default_rng(7))
    want_icm = icm(x, books, start, 3)
    for isa in qkern.available_isas():
        qkern.set_isa(isa)
        for threads in (1, 3):
            qkern.set_num_threads(threads)
            got = ils(x, books, start, 4, 3, 2, np.random.default_rng(7))
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(icm(x, books, start, 3), want_icm)


def test_icm_errors(rng):
    x, books, codes = tiny(rng, n=10)
    with pytest.raises(ValueError, match="shape"):
        icm(x, books, codes[:, :2])
    with pytest.raises(ValueError, match="out of range"):
        icm(x, books, codes + 5)
    with pytest.raises(ValueError, match="icm_iters"):
        icm(x, books, codes, icm_iters=-1)
    with pytest.raises(ValueError, match="nperts"):
        ils(x, books, codes, nperts=4)
    with pytest.raises(ValueError, match="codebooks"):
        icm(x[:, :3], books, codes)
    with pytest.raises(ValueError, match="cross must be"):
        icm(x, books, codes, cross=np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="cross must be"):
        ils(x, books, codes, 2, 2, 2, cross=search.rq_cross_table(books).astype(np.float64))


# ---- the additive quantizer ----------------------------------------------------------------
def test_aq_ils_beats_beam_and_matches_faiss_lsq(digits, monkeypatch):
    """On held-out digits (FAISS's LSQ encodes its own training vectors, in their training
    order, far better than any others: its encoder replays the training's random start)."""
    faiss = pytest.importorskip("faiss")
    m, nbits = 4, 6
    train, test = digits[:1400], digits[1400:]
    beam = AdditiveQuantizer(64, m, nbits, beam_size=4, encoder="beam").train(train)
    aq = AdditiveQuantizer(64, m, nbits, beam_size=4, refine_rounds=10).train(train)
    f = faiss.LocalSearchQuantizer(64, m, nbits)
    f.train(train)
    theirs = float(((f.decode(f.compute_codes(test)) - test) ** 2).sum(1).mean())
    ours = aq.mse(test)
    assert aq.mse(train) < beam.mse(train) and ours < beam.mse(test), (ours, beam.mse(test))
    assert ours <= 1.05 * theirs, (ours, theirs)
    # codes are reproducible: the same on another run and thread count
    qkern.set_num_threads(1)
    c1 = aq.encode(digits[:300])
    qkern.set_num_threads(3)
    np.testing.assert_array_equal(aq.encode(digits[:300]), c1)
    again = AdditiveQuantizer(64, m, nbits, beam_size=4, refine_rounds=10).train(train)
    np.testing.assert_array_equal(again.codebooks, aq.codebooks)
    # the residual-search path (past the table limit: the encoder before the look-up tables)
    # gives the same MSE up to float order (the same codes on these vectors when measured)
    monkeypatch.setattr(search, "LUT_MAX_FLOATS", 0)
    aq._cross = None
    assert abs(aq.mse(test) - ours) <= 1e-6 * ours


def test_aq_random_init_matches_faiss_lsq(digits):
    """init="random" is FAISS's LSQ training (random codes, ILS with codes carried over, the
    least-squares update shrunk toward zero): on held-out digits within 10 % of FAISS's
    LocalSearchQuantizer (which also anneals its codebooks, SR-D; this start does not: 6 %
    above it when measured), deterministic, and rebuilt from its config with its init."""
    faiss = pytest.importorskip("faiss")
    m, nbits = 4, 6
    train, test = digits[:1400], digits[1400:]
    aq = AdditiveQuantizer(64, m, nbits, beam_size=4, refine_rounds=25, init="random").train(train)
    f = faiss.LocalSearchQuantizer(64, m, nbits)
    f.train(train)
    theirs = float(((f.decode(f.compute_codes(test)) - test) ** 2).sum(1).mean())
    ours = aq.mse(test)
    assert ours <= 1.10 * theirs, (ours, theirs)
    assert aq.rq_mse is None and len(aq.mse_history) == 25
    again = AdditiveQuantizer(64, m, nbits, beam_size=4, refine_rounds=25, init="random")
    np.testing.assert_array_equal(again.train(train).codebooks, aq.codebooks)
    assert AdditiveQuantizer(**aq.config()).init == "random"


def test_aq_auto_init_picks_the_better_start_on_held_out_vectors(digits):
    """init="auto": both starts trained on a seeded 90 % of the training set, each scored by
    its MSE on the other 10 % (recomputed here in numpy from a quantizer of that start trained
    on the same split), the lower one then trained on all of it: the same codebooks as that
    start trained directly."""
    train = digits[:600]
    kw = dict(d=64, m=2, nbits=5, beam_size=2, refine_rounds=3)
    aq = AdditiveQuantizer(**kw, init="auto").train(train)
    perm = np.random.default_rng([0, 4]).permutation(600)
    fit, held = train[np.sort(perm[60:])], train[np.sort(perm[:60])]
    for start in ("rq", "random"):
        q = AdditiveQuantizer(**kw, init=start).train(fit)
        mse = float(((q.decode(q.encode(held)) - held) ** 2).sum(1).mean())
        assert aq.start_scores[start] == pytest.approx(mse, rel=1e-6)
    best = min(("rq", "random"), key=lambda s: (aq.start_scores[s], s != "rq"))
    direct = AdditiveQuantizer(**kw, init=best).train(train)
    np.testing.assert_array_equal(aq.codebooks, direct.codebooks)
    assert AdditiveQuantizer(**aq.config()).init == "auto"
    # too few vectors to hold 10 % out and still train 2^nbits codewords: the RQ start
    small = AdditiveQuantizer(**kw, init="auto").train(train[:34])
    assert small.start_scores == {}
    np.testing.assert_array_equal(
        small.codebooks, AdditiveQuantizer(**kw, init="rq").train(train[:34]).codebooks)


def test_aq_errors():
    with pytest.raises(ValueError, match="init"):
        AdditiveQuantizer(4, 2, 3, init="kmeans")
    with pytest.raises(ValueError, match="init"):
        AdditiveQuantizer(4, 2, 3, init="random", encoder="beam")
    with pytest.raises(ValueError, match="init"):
        AdditiveQuantizer(4, 2, 3, init="auto", encoder="beam")
    for bad, word in (({"encoder": "lsq"}, "encoder"), ({"nperts": 3}, "nperts"),
                      ({"icm_iters": 0}, "icm_iters"), ({"anneal": -1}, "anneal"),
                      ({"ils_iters": -1}, "ils_iters"), ({"train_ils_iters": 1.5}, "train_ils")):
        with pytest.raises(ValueError, match=word):
            AdditiveQuantizer(4, 2, 3, **bad)


# ---- progressive-dimension k-means -----------------------------------------------------------
def test_progressive_kmeans_matches_faiss_and_is_deterministic(rng):
    faiss = pytest.importorskip("faiss")
    x = (rng.standard_normal((3000, 16)) * np.geomspace(4, 0.2, 16)).astype(np.float32)
    qkern.set_num_threads(1)
    c = progressive_dim_kmeans(x, 64, steps=10, n_iter=10, seed=3)
    qkern.set_num_threads(3)
    np.testing.assert_array_equal(progressive_dim_kmeans(x, 64, steps=10, n_iter=10, seed=3), c)

    def objective(cent):
        return ((x[:, None, :].astype(np.float64) - cent[None]) ** 2).sum(-1).min(1).sum()

    f = faiss.ProgressiveDimClustering(16, 64)
    f.train(len(x), faiss.swig_ptr(x), faiss.ProgressiveDimIndexFactory())
    theirs = objective(faiss.vector_to_array(f.centroids).reshape(64, 16))
    assert objective(c) <= 1.03 * theirs, (objective(c), theirs)


@pytest.mark.parametrize("m, nbits, beam", [(4, 6, 1), (4, 6, 5)])
def test_rq_progressive_matches_faiss(digits, m, nbits, beam):
    faiss = pytest.importorskip("faiss")
    rq = ResidualQuantizer(64, m, nbits, beam_size=beam, n_iter=10, progressive_dim_steps=10)
    ours = rq.train(digits).mse(digits)
    f = faiss.ResidualQuantizer(64, m, nbits)
    f.max_beam_size = beam
    f.train_type = faiss.ResidualQuantizer.Train_progressive_dim
    f.train(digits)
    theirs = float(((f.decode(f.compute_codes(digits)) - digits) ** 2).sum(1).mean())
    assert ours <= 1.05 * theirs, (ours, theirs)
    again = ResidualQuantizer(64, m, nbits, beam_size=beam, n_iter=10, progressive_dim_steps=10)
    np.testing.assert_array_equal(again.train(digits).codebooks, rq.codebooks)


def test_progressive_errors(rng):
    x = rng.standard_normal((50, 3)).astype(np.float32)
    for kw, word in (({"k": 0}, "k"), ({"steps": 0}, "steps"), ({"n_iter": -1}, "n_iter")):
        with pytest.raises(ValueError, match=word):
            progressive_dim_kmeans(x, **{"k": 4, **kw})
    with pytest.raises(ValueError, match="finite"):
        progressive_dim_kmeans(np.full((50, 3), np.nan), 4)
    with pytest.raises(ValueError, match="need >= k"):
        progressive_dim_kmeans(x, 60)
    with pytest.raises(ValueError, match="progressive_dim_steps"):
        ResidualQuantizer(3, 2, 2, progressive_dim_steps=-1)
    with pytest.raises(ValueError, match="init_centroids"):  # the warm start's shape
        KMeans(3, 4).train(x, init_centroids=np.zeros((4, 2)))
