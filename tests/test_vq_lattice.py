"""qkern.vq.lattice against the lattices' definitions: Z^n; D_n = integer vectors with an even
sum; E8 = D8 u (D8 + 1/2), i.e. integer or all-half-integer vectors with an even sum. Nearest
points are checked by brute force over the lattice points near the input (enumerated from the
definition), Voronoi codes against the Voronoi region of r L (whose relevant vectors are, for the
root lattices D4 and E8, the minimal vectors: SPLAG ch. 21), the quantization error against the
published normalized second moments (SPLAG table 2.3)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qkern.vq import LatticeQuantizer, VQBase
from qkern.vq.lattice import nearest_point

DIM = {"Z": 1, "D4": 4, "E8": 8}
VOLUME = {"Z": 1.0, "D4": 2.0, "E8": 1.0}  # of a Voronoi cell (sqrt of the Gram determinant)
NSM = {"Z": 1 / 12, "D4": 0.0766032, "E8": 0.0716821}  # SPLAG table 2.3


def in_lattice(y: np.ndarray, lattice: str) -> np.ndarray:
    """The definition, row by row."""
    y = np.asarray(y, dtype=np.float64)
    integer = (y == np.round(y)).all(axis=-1)
    if lattice == "Z":
        return integer
    even = np.fmod(y.sum(axis=-1), 2.0) == 0
    if lattice == "D4":
        return integer & even
    half = (y - 0.5 == np.round(y - 0.5)).all(axis=-1)
    return (integer | half) & even


def box(n: int, values) -> np.ndarray:
    return np.array(list(itertools.product(values, repeat=n)), dtype=np.float64)


def points_in_box(lattice: str, radius: int) -> np.ndarray:
    """Every lattice point with coordinates in [-radius, radius], from the definition."""
    n = DIM[lattice]
    ints = box(n, range(-radius, radius + 1))
    cand = [ints]
    if lattice == "E8":
        cand.append(box(n, np.arange(-radius, radius) + 0.5))
    cand = np.concatenate(cand)
    return cand[in_lattice(cand, lattice)]


def minimal_vectors(lattice: str) -> np.ndarray:
    p = points_in_box(lattice, 2)
    norms = (p ** 2).sum(axis=1)
    m = norms[norms > 0].min()
    return p[norms == m]


@pytest.mark.parametrize("lattice, kissing, norm", [("Z", 2, 1.0), ("D4", 24, 2.0),
                                                    ("E8", 240, 2.0)])
def test_kissing_numbers_of_the_enumeration(lattice, kissing, norm):
    v = minimal_vectors(lattice)
    assert len(v) == kissing
    assert np.allclose((v ** 2).sum(axis=1), norm)


def brute_nearest(x: np.ndarray, lattice: str) -> np.ndarray:
    """The nearest lattice point among the candidates round(x) + {-1, 0, 1}^n (and, for E8,
    the half-integer ones around x): enough, the covering radius of Z^n (n <= 4), D4, E8 being
    <= 1."""
    n = DIM[lattice]
    offs = box(n, (-1, 0, 1))
    out = []
    for xc in np.array_split(x, max(1, len(x) // 100)):
        starts = [np.round(xc)]
        if lattice == "E8":
            starts.append(np.floor(xc) + 0.5)
        cand = np.concatenate([s[:, None, :] + offs[None] for s in starts], axis=1)
        dist = ((cand - xc[:, None, :]) ** 2).sum(axis=2)
        dist[~in_lattice(cand, lattice)] = np.inf
        out.append(cand[np.arange(len(xc)), np.argmin(dist, axis=1)])
    return np.concatenate(out)


@pytest.mark.parametrize("lattice", ["Z", "D4", "E8"])
def test_nearest_point_is_the_brute_force_one(lattice):
    rng = np.random.default_rng(1)
    n = max(DIM[lattice], 4)
    m = 2000 if lattice == "E8" else 4000
    x = rng.normal(scale=3.0, size=(m, n)) + rng.uniform(-50, 50, size=(m, 1))
    if lattice == "Z":
        got = nearest_point(x, "Z")
        ref = np.concatenate([brute_nearest(x[:, i:i + 1], "Z") for i in range(n)], axis=1)
    else:
        got = nearest_point(x, lattice)
        ref = brute_nearest(x, lattice)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("lattice", ["D4", "E8"])
def test_ties_give_a_nearest_lattice_point(lattice):
    # quarter-integer inputs are often equidistant from several lattice points
    rng = np.random.default_rng(2)
    x = rng.integers(-12, 13, size=(1500, DIM[lattice])) / 4.0
    got = nearest_point(x, lattice)
    ref = brute_nearest(x, lattice)
    assert in_lattice(got, lattice).all()
    np.testing.assert_allclose(((got - x) ** 2).sum(1), ((ref - x) ** 2).sum(1), atol=1e-12)
    # the documented rules
    assert nearest_point(np.array([[0.5]]), "Z")[0, 0] == 1.0
    if lattice == "E8":  # (1/4)^8 is at distance^2 1/2 from 0 and from (1/2)^8: the integer one
        np.testing.assert_array_equal(nearest_point(np.full((1, 8), 0.25), "E8"), 0.0)


@pytest.mark.parametrize("lattice", ["Z", "D4", "E8"])
def test_normalized_second_moment(lattice):
    # x uniform over [0, 2)^n, a fundamental region of 2Z^n (a sublattice of the three): the
    # error x - Q(x) is uniform over the Voronoi cell, so MSE / n = G(L) V^(2/n)
    n = DIM[lattice]
    x = np.random.default_rng(3).uniform(0, 2, size=(200_000, n))
    mse = ((x - nearest_point(x, lattice)) ** 2).sum(axis=1).mean() / n
    expected = NSM[lattice] * VOLUME[lattice] ** (2 / n)
    assert mse == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("lattice", ["Z", "D4", "E8"])
def test_high_rate_quantizer_mse(lattice):
    n = DIM[lattice]
    scale = 0.01
    q = LatticeQuantizer(8, lattice=lattice, bits_per_dim=8, scale=scale)
    x = np.random.default_rng(4).uniform(-0.5, 0.5, size=(20_000, 8)).astype(np.float32)
    x_hat = q.decode(q.encode(x))
    mse = ((x_hat.astype(np.float64) - x) ** 2).mean() / scale ** 2
    assert mse == pytest.approx(NSM[lattice] * VOLUME[lattice] ** (2 / n), rel=0.02)


def strictly_inside(y: np.ndarray, lattice: str, r: int) -> np.ndarray:
    """y in the interior of the Voronoi region of r L: y.v < r |v|^2 / 2 for every relevant
    vector v (the minimal vectors)."""
    v = minimal_vectors(lattice)
    return (y @ v.T < r * (v ** 2).sum(1) / 2).all(axis=1)


@pytest.mark.parametrize("lattice, bits", [("Z", 3), ("D4", 2), ("D4", 3),
                                           ("E8", 2), ("E8", 4)])
def test_voronoi_code_round_trips_points_inside(lattice, bits):
    n, r = DIM[lattice], 2 ** bits
    rng = np.random.default_rng(5)
    h = r // 2
    cand = rng.integers(-h, h + 1, size=(50_000, n)).astype(np.float64)
    if lattice == "E8":
        cand[::2] += np.where(rng.random((25_000, 1)) < 0.5, 0.5, -0.5)
    y = cand[in_lattice(cand, lattice)]
    y = np.unique(y[strictly_inside(y, lattice, r)], axis=0)
    assert len(y) >= min(40, (r - 1) ** n)
    d = 2 * n
    y = y[: len(y) // 2 * 2].reshape(-1, d)
    for scale in (1.0, 0.5):
        q = LatticeQuantizer(d, lattice=lattice, bits_per_dim=bits, scale=scale)
        codes = q.encode(y * scale)
        assert codes.shape == y.shape and codes.min() >= 0 and codes.max() < r
        np.testing.assert_array_equal(q.decode(codes), (y * scale).astype(np.float32))


@pytest.mark.parametrize("lattice, bits", [("Z", 3), ("D4", 1), ("D4", 2), ("E8", 1)])
def test_every_code_is_a_distinct_coset_of_rL_in_its_voronoi_region(lattice, bits):
    n, r = DIM[lattice], 2 ** bits
    q = LatticeQuantizer(n, lattice=lattice, bits_per_dim=bits, scale=1.0)
    codes = box(n, range(r)).astype(np.int64)
    y = q.decode(codes).astype(np.float64)
    assert len(y) == r ** n and in_lattice(y, lattice).all()
    v = minimal_vectors(lattice)
    assert (y @ v.T <= r * (v ** 2).sum(1) / 2).all()  # the closed region of r L
    diff = (y[:, None, :] - y[None, :, :]) / r
    same = in_lattice(diff.reshape(-1, n), lattice).reshape(len(y), len(y))
    np.testing.assert_array_equal(same, np.eye(len(y), dtype=bool))  # r^n cosets of r L
    np.testing.assert_array_equal(q.encode(y), codes)


@pytest.mark.parametrize("lattice", ["D4", "E8"])
def test_overload_is_clipped_into_the_code(lattice):
    n, r = DIM[lattice], 4
    q = LatticeQuantizer(n, lattice=lattice, bits_per_dim=2, scale=1.0)
    x = np.random.default_rng(6).normal(scale=6.0, size=(3000, n))
    y = q.decode(q.encode(x)).astype(np.float64)
    v = minimal_vectors(lattice)
    assert in_lattice(y, lattice).all()
    assert (y @ v.T <= r * (v ** 2).sum(1) / 2).all()
    outside = ~strictly_inside(x, lattice, r)
    assert outside.sum() > 100
    # a clipped point is no farther from the input than the origin is, and much nearer on
    # average (the radial clip keeps the direction)
    err, norm = ((y - x) ** 2).sum(1), (x ** 2).sum(1)
    assert (err <= norm + 1e-9).all()
    assert err[outside].mean() < 0.8 * norm[outside].mean()


def test_scalar_overload_clips_to_the_nearest_code_point():
    q = LatticeQuantizer(1, lattice="Z", bits_per_dim=2, scale=1.0)
    levels = np.sort(q.decode(np.arange(4)[:, None])[:, 0].astype(np.float64))
    x = np.random.default_rng(9).normal(scale=4.0, size=(5000, 1))
    ref = levels[np.argmin(np.abs(x - levels[None, :]), axis=1)]
    np.testing.assert_array_equal(q.reconstruct(x)[:, 0], ref)


def test_train_picks_the_best_scale():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1500, 8)).astype(np.float32)
    learned = LatticeQuantizer(8, lattice="E8", bits_per_dim=2).train(x)
    rms = float(np.sqrt((x.astype(np.float64) ** 2).mean()))
    grid = [LatticeQuantizer(8, lattice="E8", bits_per_dim=2, scale=float(s)).mse(x)
            for s in np.geomspace(rms / 4 / 4, rms / 4 * 32, 80)]
    assert learned.mse(x) <= min(grid) * 1.002
    # at equal bits E8 beats the scalar lattice on Gaussian data
    z = LatticeQuantizer(8, lattice="Z", bits_per_dim=2).train(x)
    assert learned.mse(x) < 0.85 * z.mse(x)


def test_given_scale_is_kept_and_save_load(tmp_path):
    x = np.random.default_rng(8).normal(size=(200, 8)).astype(np.float32)
    q = LatticeQuantizer(8, lattice="D4", bits_per_dim=3, scale=0.3)
    assert q.is_trained  # ready without train
    codes = q.encode(x)
    q.train(x * 100)
    assert q.scale == 0.3
    np.testing.assert_array_equal(q.encode(x), codes)
    t = LatticeQuantizer(8, lattice="D4", bits_per_dim=3).train(x)
    assert q.code_size_bits == 24 and t.codebook_bits == 32
    t.save(tmp_path / "l.safetensors")
    t2 = VQBase.load(tmp_path / "l.safetensors")
    assert type(t2) is LatticeQuantizer and t2.scale == t.scale and t2.lattice == "D4"
    np.testing.assert_array_equal(t2.reconstruct(x), t.reconstruct(x))


@pytest.mark.parametrize("kw, err, msg", [
    ({"d": 12, "lattice": "E8"}, ValueError, "not a multiple of E8's dimension 8"),
    ({"d": 8, "lattice": "A2"}, ValueError, "lattice must be one of"),
    ({"d": 8, "bits_per_dim": 0}, ValueError, "bits_per_dim"),
    ({"d": 8, "bits_per_dim": 2.0}, ValueError, "bits_per_dim"),
    ({"d": 8, "scale": -1.0}, ValueError, "positive finite"),
    ({"d": 8, "scale": "1"}, TypeError, "scale"),
])
def test_bad_arguments(kw, err, msg):
    with pytest.raises(err, match=msg):
        LatticeQuantizer(**kw)


def test_bad_codes_and_inputs():
    q = LatticeQuantizer(8, lattice="E8", bits_per_dim=2, scale=1.0)
    with pytest.raises(ValueError, match="out of range"):
        q.decode(np.full((1, 8), 4))
    with pytest.raises(ValueError, match="dimension"):
        q.encode(np.ones((2, 4)))
    with pytest.raises(ValueError, match="E8 points have 8 coordinates"):
        nearest_point(np.ones((2, 4)), "E8")
    with pytest.raises(TypeError, match="unexpected"):
        LatticeQuantizer(8).train(np.ones((4, 8)), weights=np.ones((4, 8)))
