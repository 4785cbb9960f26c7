"""The encoding paths of qkern.vq (PQ in one C++ call, the top-k kernel's lane masks, the RQ
beam search) against numpy references written from the float contract of csrc/cpu/vq/api.h:
every dot product and squared norm the sequential float32 sum over the coordinates (mul, then
add), v_j = ||c_j||^2 - 2 x.c_j in float32, the lowest index among equal values. The codes
must match bit for bit, on every ISA and thread count."""

from __future__ import annotations

import numpy as np
import pytest

import qkern
from isas import params, use
from qkern.vq import ProductQuantizer, ResidualQuantizer
from qkern.vq.search import pq_encode, topk


def ref_values(x, c):
    """v (n, k) float32 = ||c||^2 - 2 x.c, each sum sequential over t in float32."""
    x, c = np.asarray(x, np.float32), np.asarray(c, np.float32)
    s = np.zeros((x.shape[0], c.shape[0]), np.float32)
    norms = np.zeros(c.shape[0], np.float32)
    for t in range(x.shape[1]):
        s = s + x[:, t, None] * c[None, :, t]
        norms = norms + c[:, t] * c[:, t]
    return norms[None, :] - np.float32(2.0) * s


def ref_sqnorm(x):
    out = np.zeros(x.shape[0], np.float32)
    for t in range(x.shape[1]):
        out = out + x[:, t] * x[:, t]
    return out


def ref_topk(x, c, kk):
    """(idx, dist): the kk smallest v per row, ascending, ties by index; dist = max(0, x^2 + v)."""
    v = ref_values(x, c)
    idx = np.argsort(v, axis=1, kind="stable")[:, :kk]
    dist = np.maximum(np.float32(0), ref_sqnorm(x)[:, None] + np.take_along_axis(v, idx, 1))
    return idx, dist


def ref_pq(x, books):
    m, _, dsub = books.shape
    return np.stack([ref_values(x[:, j * dsub:(j + 1) * dsub], books[j]).argmin(1)
                     for j in range(m)], axis=1)


def ref_beam(x, books, beam):
    """The residual beam search of qkern.vq.rq written out: per stage each entry's kk nearest
    codewords (ref_topk), then the beam best of the entry x codeword candidates by (distance,
    parent, codeword), the residual = parent's residual - codeword (float32)."""
    n, d = x.shape
    res, codes = x[:, None, :].astype(np.float32), np.zeros((n, 1, 0), np.int64)
    for book in books:
        b, kk = res.shape[1], min(beam, book.shape[0])
        idx, dist = ref_topk(res.reshape(n * b, d), book, kk)
        idx, dist = idx.reshape(n, b * kk), dist.reshape(n, b * kk)
        sel = np.argsort(dist, axis=1, kind="stable")[:, :min(beam, b * kk)]
        parent, cid = sel // kk, np.take_along_axis(idx, sel, 1)
        codes = np.concatenate([np.take_along_axis(codes, parent[..., None], 1),
                                cid[..., None]], axis=2)
        res = np.take_along_axis(res, parent[..., None], 1) - book[cid]
    return codes[:, 0, :]


def quantized(rng, shape, levels=5):
    """Small-integer-valued float32 data: many exactly equal distances (ties)."""
    return rng.integers(0, levels, size=shape).astype(np.float32)


@pytest.mark.parametrize("isa", params())
def test_pq_encode_bitwise_reference(isa, rng):
    use(isa)
    for n, m, ksub, dsub in [(1, 1, 1, 1), (13, 3, 5, 2), (97, 4, 17, 3), (250, 8, 256, 8),
                             (40, 2, 40, 33)]:
        x = rng.standard_normal((n, m * dsub)).astype(np.float32)
        books = rng.standard_normal((m, ksub, dsub)).astype(np.float32)
        codes = pq_encode(x, books)
        assert codes.dtype == np.int64 and codes.shape == (n, m)
        np.testing.assert_array_equal(codes, ref_pq(x, books))
        xq, bq = quantized(rng, x.shape), quantized(rng, books.shape)  # ties: lowest index
        np.testing.assert_array_equal(pq_encode(xq, bq), ref_pq(xq, bq))


def test_pq_encode_threads_and_quantizer(rng):
    x = rng.standard_normal((1001, 24)).astype(np.float32)
    pq = ProductQuantizer(24, m=6, nbits=5).train(x)
    want = ref_pq(x, pq.codebooks)
    for isa in qkern.available_isas():
        qkern.set_isa(isa)
        for threads in (1, 2, 3):
            qkern.set_num_threads(threads)
            np.testing.assert_array_equal(pq.encode(x), want)
    with pytest.raises(ValueError, match="codebooks"):
        pq_encode(x, np.zeros((6, 4), np.float32))
    with pytest.raises(ValueError):
        pq_encode(x[:, :20], pq.codebooks)


@pytest.mark.parametrize("isa", params())
def test_topk_bitwise_reference(isa, rng):
    use(isa)
    for n, d, k, kk in [(1, 1, 1, 1), (30, 3, 17, 4), (61, 8, 40, 40), (200, 16, 256, 4),
                        (25, 5, 33, 7)]:
        for x, c in [(rng.standard_normal((n, d)).astype(np.float32),
                      rng.standard_normal((k, d)).astype(np.float32)),
                     (quantized(rng, (n, d), 3), quantized(rng, (k, d), 3))]:
            idx, dist = topk(x, c, kk)
            want_idx, want_dist = ref_topk(x, c, kk)
            np.testing.assert_array_equal(idx, want_idx)
            np.testing.assert_array_equal(dist, want_dist)


@pytest.mark.parametrize("isa", params())
@pytest.mark.parametrize("beam", [1, 3, 8])
def test_rq_encode_bitwise_reference(isa, beam, rng):
    use(isa)
    x = rng.standard_normal((300, 12)).astype(np.float32)
    rq = ResidualQuantizer(12, m=3, nbits=5, beam_size=beam, n_iter=4).train(x)
    np.testing.assert_array_equal(rq.encode(x), ref_beam(x, rq.codebooks, beam))
    xq = quantized(rng, (120, 12), 3)
    books = quantized(rng, (3, 32, 12), 3) - 1.0  # ties everywhere
    rq.codebooks = books
    np.testing.assert_array_equal(rq.encode(xq), ref_beam(xq, books, beam))


def test_rq_encode_threads_agree(rng):
    x = rng.standard_normal((700, 16)).astype(np.float32)
    rq = ResidualQuantizer(16, m=4, nbits=6, beam_size=4, n_iter=4).train(x)
    want = ref_beam(x, rq.codebooks, 4)
    for threads in (1, 2, 3):
        qkern.set_num_threads(threads)
        np.testing.assert_array_equal(rq.encode(x), want)
