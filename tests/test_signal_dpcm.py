"""Closed-loop DPCM, delta modulation and delta quantization (qkern.signal) against numpy
coders written from the definition (docs/signal.md), on every ISA and thread count; the
closed loop's per-sample error bound against an open-loop coder whose error accumulates;
least-squares predictors against numpy.linalg.lstsq; tensor streams and their bit counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import isas
import qkern
from qkern.signal import (
    compress_stream,
    delta_decode,
    delta_encode,
    dpcm_decode,
    dpcm_encode,
    fit_predictor,
    sqnr,
    uniform_baseline,
)


def ref_dpcm(x, coef, step, bits, quantizer="uniform", mu=255.0):
    """The DPCM encoder from its definition, vectorized over channels, float32 arithmetic."""
    x = np.asarray(x, np.float32)
    T, C = x.shape
    xh = np.zeros((T, C), np.float32)
    codes = np.zeros((T, C), np.int64)
    half = 2 ** (bits - 1)
    for t in range(T):
        pred = np.zeros(C, np.float32)
        for k in range(1, coef.shape[0] + 1):
            if t - k >= 0:
                pred = pred + coef[k - 1] * xh[t - k]
        r = x[t] - pred
        if quantizer == "mulaw":
            M, lmu = half - 1, np.log1p(mu)
            y = np.log1p(mu * np.minimum(np.abs(r.astype(np.float64)) / step, 1.0)) / lmu
            m = np.rint(y * M)
            q = np.where(r < 0, -m, m)
            v = (np.sign(q) * step.astype(np.float64) * np.expm1(np.abs(q) / M * lmu) / mu)
            v = v.astype(np.float32)
        elif bits == 1:
            q = np.where(r >= 0, 1, 0) - half
            v = np.where(r >= 0, step, -step).astype(np.float32)
        else:
            q = np.clip(np.rint(r / step), -half, half - 1)
            v = q.astype(np.float32) * step
        codes[t] = q + half
        xh[t] = pred + v
    return codes.astype(np.uint8), xh


def _signal(rng, T, C):
    """AR(2)-like smooth streams plus noise: the kind of signal DPCM is for."""
    x = np.zeros((T, C))
    e = rng.standard_normal((T, C))
    for t in range(2, T):
        x[t] = 1.6 * x[t - 1] - 0.7 * x[t - 2] + e[t]
    return x.astype(np.float32)


@pytest.mark.parametrize("isa", isas.params())
@pytest.mark.parametrize("order,bits", [(1, 1), (1, 3), (2, 2), (2, 4), (3, 5), (4, 8)])
def test_dpcm_matches_the_definition(isa, order, bits, rng):
    isas.use(isa)
    x = _signal(rng, 700, 19)  # 19 channels: two AVX2 vectors and a scalar tail
    coef = rng.uniform(-0.6, 0.9, (order, 19)).astype(np.float32)
    step = rng.uniform(0.2, 2.0, 19).astype(np.float32)
    codes, xh = ref_dpcm(x, coef, step, bits)
    enc = dpcm_encode(x, coef=coef, bits=bits, step=step)
    np.testing.assert_array_equal(enc.codes, codes)
    np.testing.assert_array_equal(enc.xhat, xh)
    np.testing.assert_array_equal(dpcm_decode(enc), xh)


@pytest.mark.parametrize("isa", isas.params())
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mulaw_residual_quantizer_matches_the_definition(isa, bits, rng):
    isas.use(isa)
    x = _signal(rng, 400, 9)
    coef = np.array([[1.5], [-0.6]], np.float32)
    step = np.full(9, 6.0, np.float32)
    codes, xh = ref_dpcm(x, np.broadcast_to(coef, (2, 9)), step, bits, "mulaw")
    enc = dpcm_encode(x, coef=coef, bits=bits, step=step, quantizer="mulaw")
    np.testing.assert_array_equal(enc.codes, codes)
    np.testing.assert_allclose(enc.xhat, xh, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(dpcm_decode(enc), enc.xhat)


@pytest.mark.parametrize("isa", isas.params())
def test_delta_modulation_and_delta_quantization(isa, rng):
    isas.use(isa)
    x = np.cumsum(rng.standard_normal(3000)).astype(np.float32)
    dm = delta_encode(x, bits=1, step=0.8)
    ref, prev = [], np.float32(0)
    for v in x:  # xh[t] = xh[t-1] +- step by the sign of x[t] - xh[t-1]
        prev = prev + (np.float32(0.8) if v - prev >= 0 else np.float32(-0.8))
        ref.append(prev)
    np.testing.assert_array_equal(delta_decode(dm), np.array(ref, np.float32))
    assert dm.codes.max() == 1 and dm.bits == 1
    dq = delta_encode(x, bits=4, step=0.5)
    codes, xh = ref_dpcm(x[:, None], np.ones((1, 1), np.float32), np.float32([0.5]), 4)
    np.testing.assert_array_equal(dq.codes, codes[:, 0])
    np.testing.assert_array_equal(delta_decode(dq), xh[:, 0])


def test_closed_loop_error_is_bounded_open_loop_accumulates(rng):
    x = np.cumsum(rng.standard_normal((20000, 4)), axis=0).astype(np.float32)
    step = np.float32(0.125)  # 8 bits x 0.125: residuals up to +-16, far beyond the steps here
    enc = dpcm_encode(x, coef=[1.0], bits=8, step=step)
    err = np.abs(enc.xhat.astype(np.float64) - x)
    assert err.max() <= step / 2 * (1 + 1e-6) + np.abs(x).max() * 2 ** -23
    # open loop: the residual of the ORIGINAL signal is quantized; the decoder's sum drifts
    r = np.diff(x, axis=0, prepend=np.zeros((1, 4), np.float32))
    open_rec = np.cumsum(np.clip(np.rint(r / step), -128, 127) * step, axis=0)
    assert np.abs(open_rec - x).max() > 20 * step / 2


def test_least_squares_predictor_matches_lstsq(rng):
    x = _signal(rng, 3000, 5)
    for p in (1, 2, 3, 4):
        coef = fit_predictor(x, p)
        assert coef.shape == (p, 5)
        for c in range(5):
            lags = np.stack([x[p - k:len(x) - k, c] for k in range(1, p + 1)], axis=1)
            ref = np.linalg.lstsq(lags.astype(np.float64), x[p:, c].astype(np.float64),
                                  rcond=None)[0]
            np.testing.assert_allclose(coef[:, c], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fit_predictor(x, 2), [[1.6] * 5, [-0.7] * 5], atol=0.05)


def test_results_do_not_depend_on_threads(rng):
    x = _signal(rng, 300, 203)
    qkern.set_num_threads(1)
    a = dpcm_encode(x, order=3, bits=3)
    qkern.set_num_threads(3)
    b = dpcm_encode(x, order=3, bits=3)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.xhat, b.xhat)


@pytest.mark.parametrize("method", ["dpcm", "delta", "adpcm"])
def test_compress_stream_shapes_types_and_rate(method, rng):
    x = torch.from_numpy(_signal(rng, 256, 24)).reshape(256, 4, 6).permute(1, 0, 2)
    x = x.to(torch.bfloat16)  # (4, 256, 6): time along axis 1
    bits = 4
    c = compress_stream(x, axis=1, method=method, bits=bits, order=2)
    y = c.decompress()
    assert isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == torch.bfloat16
    side = {"dpcm": 3, "delta": 2, "adpcm": 1}[method]  # float32 values per channel
    assert c.bits_per_value == pytest.approx(bits + 32 * side * 24 / x.numel())
    xf = x.float().numpy()
    assert sqnr(xf, y.float()) > 15
    # the streams run along axis 1 and are coded independently: x[1, :, 2] alone gives the same
    one = compress_stream(np.ascontiguousarray(xf[1, :, 2]), axis=0, method=method, bits=bits)
    assert torch.equal(torch.from_numpy(one.decompress()).to(torch.bfloat16), y[1, :, 2])


def test_dpcm_beats_uniform_on_smooth_signals_not_on_noise(rng):
    t = np.arange(8192, dtype=np.float32)
    smooth = np.stack([np.sin(t / 40), np.sin(t / 25 + 1) + 0.5 * np.sin(t / 7)], axis=1)
    noise = rng.standard_normal((8192, 2)).astype(np.float32)
    for x, wins in ((smooth, True), (noise, False)):
        c = compress_stream(x, method="dpcm", bits=3, order=2)
        xu, bpv = uniform_baseline(x, bits=3)
        assert abs(c.bits_per_value - bpv) < 0.05
        assert (sqnr(x, c.decompress()) > sqnr(x, xu) + 10) == wins


def test_sqnr_definition():
    x, y = np.array([3.0, 4.0]), np.array([3.0, 3.0])
    assert sqnr(x, y) == pytest.approx(10 * np.log10(25.0))
    assert sqnr(x, x) == float("inf")


def test_errors_name_the_problem():
    x = np.zeros((10, 2), np.float32)
    with pytest.raises(ValueError, match="order"):
        dpcm_encode(x, order=5)
    with pytest.raises(ValueError, match="order"):
        dpcm_encode(x, coef=np.zeros((5, 2)))
    with pytest.raises(ValueError, match="bits"):
        dpcm_encode(x, bits=9)
    with pytest.raises(ValueError, match="bits"):
        dpcm_encode(x, bits=1, quantizer="mulaw")
    with pytest.raises(ValueError, match="quantizer"):
        dpcm_encode(x, quantizer="alaw")
    with pytest.raises(ValueError, match="step must be positive"):
        dpcm_encode(x, step=0.0)
    with pytest.raises(ValueError, match="NaN"):
        dpcm_encode(np.full(4, np.nan, np.float32))
    with pytest.raises(TypeError, match="real number"):
        dpcm_encode(np.array(["a"]))
    enc = dpcm_encode(x, bits=2)
    enc.codes[0, 0] = 4
    with pytest.raises(ValueError, match="0..3"):
        dpcm_decode(enc)
    with pytest.raises(ValueError, match="method"):
        compress_stream(x, method="lpc")
    with pytest.raises(ValueError, match="axis"):
        compress_stream(x, axis=2)
    with pytest.raises(ValueError, match="order"):
        compress_stream(x, order=0)
    with pytest.raises(ValueError, match="no samples"):
        compress_stream(np.zeros((0, 3), np.float32))
    assert dpcm_encode(np.zeros((0, 3), np.float32)).codes.shape == (0, 3)
