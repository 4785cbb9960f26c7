"""Log quantization (any base) and the log-domain matmul kernel (csrc/cpu/logmm) against numpy
written from the definitions: nearest magnitude by brute-force argmin, products
sign_x sign_w base^(e_x + e_w) summed term by term; base 2 against qkern's log2_<b> codebook."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qkern
from isas import params, use
from qkern.logdomain import (
    LogTensor,
    log_dequantize,
    log_matmul,
    log_matmul_reference,
    log_quantize,
)


def _decode_np(q: LogTensor):
    """(exponent, sign, nonzero) by the log2_<b> layout, in numpy."""
    c = q.codes.numpy().astype(np.int64)
    sb = 1 << (q.bits - 1)
    idx = c & (sb - 1)
    return idx - (sb - 1), np.where(c & sb, -1.0, 1.0), idx != 0


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_base2_codes_are_the_log2_format_codes(bits):
    torch.manual_seed(bits)
    x = torch.randn(64, 40) * torch.rand(64, 1) * 3
    q = log_quantize(x, bits, 2.0)
    ref = qkern.quantize(x, f"log2_{bits}", granularity="tensor", scale=q.scale)
    assert torch.equal(q.codes, ref.codes)
    assert torch.equal(log_dequantize(q), ref.dequantize())


@pytest.mark.parametrize("base,bits", [(2**0.5, 4), (1.3, 5), (2**0.25, 6), (3.0, 3)])
def test_codes_are_the_nearest_magnitude_for_any_base(base, bits):
    rng = np.random.default_rng(bits)
    x = torch.from_numpy(rng.standard_normal((32, 24)).astype(np.float32))
    q = log_quantize(x, bits, base, per_row=True)
    k = 2 ** (bits - 1) - 1
    mags = np.array([0.0] + [base ** (i - k) for i in range(1, k + 1)])
    s = np.abs(x.numpy().astype(np.float64)).max(1, keepdims=True)
    np.testing.assert_allclose(q.scale.numpy(), s[:, 0], rtol=1e-7)
    a = np.abs(x.numpy()) / q.scale.numpy()[:, None].astype(np.float64)
    dist = np.abs(a[..., None] - mags)
    want = dist.argmin(-1)
    e, sign, nz = _decode_np(q)
    got = np.where(nz, e + k, 0)
    clear = np.sort(dist, -1)[..., 1] - np.sort(dist, -1)[..., 0] > 1e-9  # no ties
    np.testing.assert_array_equal(got[clear], want[clear])
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(sign, np.where(x.numpy() < 0, -1.0, 1.0))


def _brute(xq: LogTensor, wq: LogTensor) -> np.ndarray:
    ex, sx, nx = _decode_np(xq)
    ew, sw, nw = _decode_np(wq)
    terms = (sx[:, None, :] * sw[None] * xq.base ** (ex[:, None, :] + ew[None]).astype(float)
             * (nx[:, None, :] & nw[None]))
    return (terms.sum(-1) * xq.scale.numpy().astype(np.float64).reshape(-1, 1)
            * wq.scale.numpy().astype(np.float64).reshape(1, -1)), np.abs(terms).sum(-1)


@pytest.mark.parametrize("isa", params())
@pytest.mark.parametrize("bits,base", [(4, 2.0), (5, 2**0.5), (6, 2**0.25), (8, 2**(1 / 64)),
                                       (8, 2.0)])
def test_log_matmul_matches_the_definition(isa, bits, base):
    use(isa)
    torch.manual_seed(bits)
    x = torch.randn(13, 37)
    x[2, :5] = 0.0
    x[3] = 0.0  # an all-zero row
    w = torch.randn(11, 37)
    w[:, 7] = -1e-9  # negative zeros
    xq, wq = log_quantize(x, bits, base, per_row=True), log_quantize(w, bits, base)
    want, mag = _brute(xq, wq)
    got = log_matmul(xq, wq).double().numpy()
    s = (xq.scale.double().reshape(-1, 1) * wq.scale.double()).numpy()
    # float32 sums of K terms (table entries exact to 1/2 ulp) against the float64 definition
    assert np.all(np.abs(got - want) <= 40 * 2.0**-23 * mag * s + 1e-30)
    np.testing.assert_array_equal(got[3], 0.0)
    np.testing.assert_allclose(log_matmul_reference(xq, wq).numpy(), want, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("f", [0, 1, 4, 5, 6])  # AVX-512: one-register, two-register, gather
def test_every_isa_and_thread_count_gives_the_same_bits(f):
    torch.manual_seed(f)
    base = 2.0 ** (1.0 / 2**f)
    xq = log_quantize(torch.randn(70, 129), 8, base, per_row=True)
    wq = log_quantize(torch.randn(45, 129), 7, base, per_row=True)
    outs, before = [], qkern.get_num_threads()
    try:
        for isa in qkern.available_isas():
            qkern.set_isa(isa)
            for t in (1, 3):
                qkern.set_num_threads(t)
                outs.append(log_matmul(xq, wq))
    finally:
        qkern.set_isa("auto")
        qkern.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bits"):
        log_quantize(x, 9)
    with pytest.raises(ValueError, match="base"):
        log_quantize(x, 4, base=1.0)
    with pytest.raises(ValueError, match="NaN"):
        log_quantize(torch.tensor([1.0, float("nan")]), 4)
    with pytest.raises(TypeError, match="uint8"):
        q = log_quantize(x, 4)
        log_matmul(LogTensor(q.codes.int(), q.scale, 4, 2.0), q)
    with pytest.raises(TypeError, match="floating-point"):
        log_quantize(torch.ones(3, dtype=torch.int32), 4)
    a, b = log_quantize(x, 4, 1.5), log_quantize(x, 4, 1.5)
    with pytest.raises(ValueError, match="2\\^\\(1/2\\^f\\)"):
        log_matmul(a, b)
    assert log_matmul_reference(a, b).shape == (4, 4)  # any base in the reference
    with pytest.raises(ValueError, match="same base"):
        log_matmul(log_quantize(x, 4, 2.0), log_quantize(x, 4, 2**0.5))
    with pytest.raises(ValueError, match="\\(N, K\\)"):
        log_matmul(log_quantize(x, 4), log_quantize(torch.randn(3, 7), 4))
