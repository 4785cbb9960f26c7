"""qkern.vq.search (the C++ nearest-centroid and ADC kernels, every ISA) against numpy brute
force written from the definitions: argmin over the full float64 distance matrix, the ADC
table as float64 sub-vector distances, the scan as a sum of table look-ups."""

from __future__ import annotations

import numpy as np
import pytest

import qkern
from isas import params, use
from qkern import _C
from qkern.vq.search import adc_scan, adc_table, assign

SHAPES = [(1, 1, 1), (7, 2, 5), (50, 3, 16), (61, 8, 17), (200, 17, 33), (301, 64, 256),
          (13, 4, 1000)]


def brute(x, c):
    return ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)


def check_assign(x, c, codes, dist):
    D = brute(x, c)
    best = D.min(1)
    # the chosen centroid is a nearest one up to the expansion's float error (a tie otherwise)
    scale = (x.astype(np.float64) ** 2).sum(1) + (c.astype(np.float64) ** 2).sum(1).max()
    slack = 1e-5 * scale
    assert (D[np.arange(len(x)), codes] <= best + slack).all()
    exact = codes == D.argmin(1)
    assert exact.mean() > 0.99
    np.testing.assert_allclose(dist, best, rtol=1e-4, atol=1e-5 * scale.max())
    assert dist.dtype == np.float32 and codes.dtype == np.int64 and (dist >= 0).all()


@pytest.mark.parametrize("isa", params())
def test_assign_matches_brute_force(isa, rng):
    use(isa)
    for n, d, k in SHAPES:
        x = rng.standard_normal((n, d)).astype(np.float32)
        c = rng.standard_normal((k, d)).astype(np.float32) * 1.5
        codes, dist = assign(x, c)
        check_assign(x, c, codes, dist)


@pytest.mark.parametrize("isa", params())
def test_assign_ties_take_the_lowest_index(isa, rng):
    use(isa)
    base = rng.standard_normal((5, 6)).astype(np.float32)
    c = np.concatenate([base, base, base[::-1]])  # every centroid three times
    x = np.concatenate([base, rng.standard_normal((40, 6)).astype(np.float32)])
    codes, _ = assign(x, c)
    D = brute(x, c)
    first = np.array([np.flatnonzero(np.isclose(r, r.min(), rtol=0, atol=1e-9))[0] for r in D])
    np.testing.assert_array_equal(codes, first)
    np.testing.assert_array_equal(codes[:5], np.arange(5))


@pytest.mark.parametrize("isa", params())
@pytest.mark.parametrize("k", [40, 256])
def test_assign_exact_ties_across_lanes_and_panels(isa, rng, k):
    """Small integers: every distance exact and most tied, between lanes, vectors and panels
    alike, so the lanes' reduction decides: the lowest index of the smallest distance."""
    use(isa)
    x = rng.integers(-3, 4, (500, 2)).astype(np.float32)
    c = rng.integers(-2, 3, (k, 2)).astype(np.float32)
    codes, dist = assign(x, c)
    D = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(codes, D.argmin(1))  # argmin: the first of equal minima
    np.testing.assert_array_equal(dist, D.min(1))


def test_assign_isas_and_threads_agree_bitwise(rng):
    x = rng.standard_normal((997, 24)).astype(np.float32)
    c = rng.standard_normal((70, 24)).astype(np.float32)
    qkern.set_isa("scalar")
    want = assign(x, c)
    for isa in qkern.available_isas():
        qkern.set_isa(isa)
        for threads in (1, 2, 3):
            qkern.set_num_threads(threads)
            got = assign(x, c)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("isa", params())
def test_assign_int32_codes(isa, rng):
    use(isa)
    x = rng.standard_normal((100, 5)).astype(np.float32)
    c = rng.standard_normal((20, 5)).astype(np.float32)
    codes = np.empty(100, dtype=np.int32)
    dist = np.empty(100, dtype=np.float32)
    _C.vq_assign_raw(x.ctypes.data, 100, 5, c.ctypes.data, 20, codes.ctypes.data, False,
                     dist.ctypes.data)
    check_assign(x, c, codes.astype(np.int64), dist)


def test_assign_large_offsets_clamped(rng):
    x = (1000.0 + rng.standard_normal((30, 8)) * 1e-3).astype(np.float32)
    codes, dist = assign(x, x[:3])
    # the true distances are ~1e-5; the stated bound is d 2^-24 (||x||^2 + ||c||^2) (api.h)
    bound = 8 * 2.0**-24 * 2 * (x.astype(np.float64) ** 2).sum(1)
    assert (dist >= 0).all() and (dist <= bound).all() and bound.max() < 10


@pytest.mark.parametrize("isa", params())
def test_adc_table_and_scan(isa, rng):
    use(isa)
    for m, ksub, dsub, n, dtype in [(1, 2, 1, 5, np.uint8), (3, 16, 2, 37, np.uint8),
                                     (8, 256, 4, 1001, np.uint8), (17, 20, 3, 40, np.uint8),
                                     (4, 1000, 2, 333, np.uint16), (2, 256, 8, 1, np.uint16),
                                     (5, 65536, 1, 70, np.uint16)]:
        cb = rng.standard_normal((m, ksub, dsub)).astype(np.float32)
        q = rng.standard_normal((3, m * dsub)).astype(np.float32)
        t = adc_table(q, cb)
        want_t = ((q.reshape(3, m, 1, dsub).astype(np.float64) - cb[None]) ** 2).sum(-1)
        np.testing.assert_allclose(t, want_t, rtol=1e-5, atol=1e-6)
        codes = rng.integers(0, ksub, (n, m)).astype(dtype)
        got = adc_scan(t, codes)
        want = t.astype(np.float64)[:, np.arange(m)[None, :], codes].sum(-1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert got.shape == (3, n) and got.dtype == np.float32


@pytest.mark.parametrize("ksub", [5, 16, 256])  # the permutation paths and the scalar loop
def test_adc_isas_and_threads_agree_bitwise(rng, ksub):
    cb = rng.standard_normal((8, ksub, 3)).astype(np.float32)
    q = rng.standard_normal((4, 24)).astype(np.float32)
    codes = rng.integers(0, ksub, (5003, 8)).astype(np.uint8)
    qkern.set_isa("scalar")
    t0 = adc_table(q, cb)
    d0 = adc_scan(t0, codes)
    for isa in qkern.available_isas():
        qkern.set_isa(isa)
        for threads in (1, 2):
            qkern.set_num_threads(threads)
            np.testing.assert_array_equal(adc_table(q, cb), t0)
            np.testing.assert_array_equal(adc_scan(t0, codes), d0)
            np.testing.assert_array_equal(adc_scan(t0, codes.astype(np.uint16)), d0)
            np.testing.assert_array_equal(adc_scan(t0[:1], codes), d0[:1])


def test_errors(rng):
    c = rng.standard_normal((4, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="dimension 2, the quantizer's is 3"):
        assign(np.ones((2, 2)), c)
    with pytest.raises(ValueError, match="NaN"):
        assign(np.array([[np.nan, 0, 0]]), c)
    with pytest.raises(ValueError, match="centroids contains NaN"):
        assign(np.ones((2, 3)), np.full((2, 3), np.inf))
    with pytest.raises(ValueError, match="centroids must have 2 dimensions"):
        assign(np.ones((2, 3)), np.ones(3))
    with pytest.raises(ValueError, match="centroids is empty"):
        assign(np.ones((2, 3)), np.ones((0, 3)))
    t = adc_table(np.ones((2, 6)), rng.standard_normal((3, 16, 2)))
    with pytest.raises(ValueError, match="dimension 5, the quantizer's is 6"):
        adc_table(np.ones((2, 5)), rng.standard_normal((3, 16, 2)))
    with pytest.raises(TypeError, match="uint8 or uint16"):
        adc_scan(t, np.zeros((4, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="shape \\(n, 3\\)"):
        adc_scan(t, np.zeros((4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="column 1 has 16, the table has ksub = 16"):
        adc_scan(t, np.array([[0, 16, 0]], dtype=np.uint8))
    with pytest.raises(ValueError, match="table must have 3 dimensions"):
        adc_scan(t[0], np.zeros((4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="must be positive"):
        _C.vq_assign_raw(1, 1, 0, 1, 1, 1, True, 1)
    with pytest.raises(ValueError, match="null pointer"):
        _C.pq_adc_scan_raw(0, 1, 16, 0, 1, 3, 1, 0)
    with pytest.raises(ValueError, match="code_bytes"):
        _C.pq_adc_scan_raw(1, 1, 16, 1, 1, 3, 4, 1)
    with pytest.raises(ValueError, match="exceeds 2\\^56"):
        _C.vq_assign_raw(1, 2**60, 64, 1, 1, 1, True, 1)
    with pytest.raises(ValueError, match="k must be < 2\\^31"):
        _C.vq_assign_raw(1, 1, 1, 1, 2**31, 1, True, 1)
    with pytest.raises(ValueError, match="exceeds 2\\^56"):
        _C.pq_adc_scan_raw(1, 2**40, 16, 1, 2**40, 3, 1, 1)
