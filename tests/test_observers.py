"""qkern.observers against independent references: torch.ao's observers on the same batches,
numpy.percentile, a from-spec numpy KL (TensorRT entropy) calibrator, and the LSQ paper's
gradient formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.ao.quantization import observer as tao

import qkern
from qkern import observers as O


def _batches(kind: str, seed: int = 0, shape=(16, 96), n: int = 4) -> list[torch.Tensor]:
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if kind == "gauss":
            x = g.standard_normal(shape) * (1 + 0.5 * i) + 0.1 * i
        elif kind == "laplace":
            x = g.laplace(size=shape)
        elif kind == "outliers":
            x = g.standard_normal(shape)
            x.reshape(-1)[i::97] *= 40
        elif kind == "uniform":
            x = g.uniform(-1 + 0.2 * i, 2, shape)
        elif kind == "relu":
            x = np.maximum(g.standard_normal(shape), 0) * (1 + i)
        else:
            raise ValueError(kind)
        out.append(torch.from_numpy(x.astype(np.float32)))
    return out


def _feed(obs, batches):
    for b in batches:
        assert obs(b) is b
    return obs


KINDS = ["gauss", "laplace", "outliers", "uniform", "relu"]


# ------------------------------------------------------------------ qparams == qkern.quantize's
@pytest.mark.parametrize("fmt,symmetric", [("int8", True), ("int8", False), ("uint8", False),
                                           ("int4", True), ("int4", False), ("int2", False),
                                           ("uint4", True), ("fp8_e4m3", True),
                                           ("fp8_e5m2", True), ("nf4", True),
                                           ("fp4_e2m1", True), ("mulaw", True)])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_minmax_qparams_equal_quantize_dynamic(fmt, symmetric, granularity):
    """On one batch, MinMax's parameters are exactly the ones qkern.quantize derives itself."""
    x = _batches("outliers", 1)[0]
    if fmt.startswith("uint") and symmetric:
        x = x.abs()
    obs = _feed(O.MinMaxObserver(fmt, symmetric=symmetric, granularity=granularity), [x])
    scale, zp = obs.calculate_qparams()
    ref = qkern.quantize(x, fmt, symmetric=symmetric, granularity=granularity)
    assert scale.dtype == torch.float32
    assert torch.equal(scale, ref.scale)
    if symmetric:
        assert zp is None
    else:
        assert zp.dtype == torch.int32 and torch.equal(zp, ref.zero_point)
    q = obs.quantize(x)
    assert torch.equal(q.codes, ref.codes)
    assert torch.equal(obs.fake_quantize(x), ref.dequantize())


def test_qparams_from_range_definition():
    lo, hi = torch.tensor([-1.0, 0.5, 2.0, 0.0]), torch.tensor([3.0, 1.0, 4.0, 0.0])
    s, zp = O.qparams_from_range(lo, hi, "int8", symmetric=False)
    # lo' = min(lo, 0), hi' = max(hi, 0); scale = (hi' - lo') / 255; zp = -128 - rne(lo'/scale)
    exp = np.float32([4.0, 1.0, 4.0, 0.0]) / np.float32(255)
    exp[3] = 1.0  # zero range -> scale 1
    np.testing.assert_array_equal(s.numpy(), exp)
    np.testing.assert_array_equal(zp.numpy(), [-128 - round(-1.0 / exp[0]), -128, -128, -128])
    s, zp = O.qparams_from_range(lo, hi, "int4")
    np.testing.assert_array_equal(s.numpy(), np.float32([3.0, 1.0, 4.0, 1.0 * 7]) / 7)
    assert zp is None
    s, _ = O.qparams_from_range(torch.tensor(-896.0), torch.tensor(10.0), "fp8_e4m3")
    assert float(s) == 2.0
    s, _ = O.qparams_from_range(torch.tensor(0.0), torch.tensor(1e-40), "int8")
    assert float(s) == torch.finfo(torch.float32).tiny  # positive below FLT_MIN -> FLT_MIN
    assert float(s) == float(qkern.quantize(torch.tensor([1e-40]), "int8").scale)


# --------------------------------------------------------------------- torch.ao: MinMax family
TORCH_ASYM = [("uint8", torch.quint8), ("int8", torch.qint8)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt,dtype", TORCH_ASYM)
def test_minmax_matches_torch(kind, fmt, dtype):
    batches = _batches(kind, 2)
    ours = _feed(O.MinMaxObserver(fmt, symmetric=False), batches)
    ref = _feed(tao.MinMaxObserver(dtype=dtype, qscheme=torch.per_tensor_affine), batches)
    lo, hi = ours.min_max_range()
    assert float(lo) == float(ref.min_val) and float(hi) == float(ref.max_val)
    # affine: the same definition (scale = (hi' - lo') / (qmax - qmin), zp = qmin - rne(lo'/s))
    s, zp = ours.calculate_qparams()
    rs, rzp = ref.calculate_qparams()
    assert float(s) == float(rs) and int(zp) == int(rzp)


@pytest.mark.parametrize("kind", KINDS)
def test_minmax_symmetric_range_matches_torch(kind):
    """Same range; torch's qint8 symmetric scale is amax / 127.5, qkern's amax / 127 (codes
    stay in [-127, 127] for in-range data: an intended difference, docs/numerics.md)."""
    batches = _batches(kind, 3)
    ours = _feed(O.MinMaxObserver("int8"), batches)
    ref = _feed(tao.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
                batches)
    lo, hi = ours.min_max_range()
    assert float(lo) == float(ref.min_val) and float(hi) == float(ref.max_val)
    s, _ = ours.calculate_qparams()
    rs, rzp = ref.calculate_qparams()
    assert int(rzp) == 0
    np.testing.assert_allclose(float(s) * 127, float(rs) * 127.5, rtol=1e-6)


@pytest.mark.parametrize("axis,shape", [(0, (24, 40)), (1, (6, 24, 3, 3)), (-1, (5, 7, 24))])
@pytest.mark.parametrize("fmt,dtype", TORCH_ASYM)
def test_per_channel_minmax_matches_torch(axis, shape, fmt, dtype):
    g = np.random.default_rng(4)
    batches = [torch.from_numpy(g.laplace(size=shape).astype(np.float32) * (i + 1))
               for i in range(3)]
    ours = _feed(O.MinMaxObserver(fmt, symmetric=False, granularity="channel", axis=axis),
                 batches)
    ref = _feed(tao.PerChannelMinMaxObserver(ch_axis=axis % len(shape), dtype=dtype,
                                             qscheme=torch.per_channel_affine), batches)
    lo, hi = ours.min_max_range()
    assert lo.shape == (24,)
    assert torch.equal(lo, ref.min_val) and torch.equal(hi, ref.max_val)
    s, zp = ours.calculate_qparams()
    rs, rzp = ref.calculate_qparams()
    assert torch.equal(s, rs) and torch.equal(zp, rzp.to(torch.int32))
    q = ours.quantize(batches[0])  # qkern accepts the parameters as given
    assert q.scale.shape == (24,)


@pytest.mark.parametrize("c", [0.01, 0.3, 1.0])
@pytest.mark.parametrize("kind", ["gauss", "outliers"])
def test_moving_average_matches_torch(c, kind):
    batches = _batches(kind, 5, n=6)
    ours = _feed(O.MovingAverageMinMaxObserver("uint8", symmetric=False, averaging_constant=c),
                 batches)
    ref = _feed(tao.MovingAverageMinMaxObserver(averaging_constant=c, dtype=torch.quint8),
                batches)
    lo, hi = ours.min_max_range()
    np.testing.assert_allclose(float(lo), float(ref.min_val), rtol=1e-6)
    np.testing.assert_allclose(float(hi), float(ref.max_val), rtol=1e-6)
    s, zp = ours.calculate_qparams()
    rs, rzp = ref.calculate_qparams()
    np.testing.assert_allclose(float(s), float(rs), rtol=1e-6)
    assert abs(int(zp) - int(rzp)) <= 1

    och = _feed(O.MovingAverageMinMaxObserver("int8", symmetric=False, averaging_constant=c,
                                              granularity="channel", axis=1), batches)
    rch = _feed(tao.MovingAveragePerChannelMinMaxObserver(averaging_constant=c, ch_axis=1,
                                                          dtype=torch.qint8,
                                                          qscheme=torch.per_channel_affine),
                batches)
    lo, hi = och.min_max_range()
    np.testing.assert_allclose(lo.numpy(), rch.min_val.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(hi.numpy(), rch.max_val.numpy(), rtol=1e-6, atol=1e-7)


def test_moving_average_formula():
    obs = O.MovingAverageMinMaxObserver(averaging_constant=0.25)
    _feed(obs, [torch.tensor([-1.0, 2.0]), torch.tensor([-5.0, 6.0]), torch.tensor([0.0, 2.0])])
    lo, hi = obs.min_max_range()
    exp_lo = -1.0 + 0.25 * (-5.0 + 1.0)
    exp_lo += 0.25 * (0.0 - exp_lo)
    exp_hi = 2.0 + 0.25 * (6.0 - 2.0)
    exp_hi += 0.25 * (2.0 - exp_hi)
    assert float(lo) == pytest.approx(exp_lo) and float(hi) == pytest.approx(exp_hi)


# ------------------------------------------------------------------- torch.ao: HistogramObserver
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fmt,dtype,symmetric", [("uint8", torch.quint8, False),
                                                 ("int8", torch.qint8, True)])
def test_histogram_matches_torch(kind, seed, fmt, dtype, symmetric):
    batches = _batches(kind, seed, shape=(32, 257))
    ours = _feed(O.HistogramObserver(fmt, symmetric=symmetric), batches)
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    ref = _feed(tao.HistogramObserver(dtype=dtype, qscheme=qscheme), batches)
    assert ours.hist.lo == float(ref.min_val) and ours.hist.hi == float(ref.max_val)
    width = ours.hist.width
    # the accumulated histograms agree up to the re-binning of widened ranges (float64 here,
    # float32 in torch, so a sub-bin midpoint can land in the neighbouring bin)
    counts = ref.histogram.double().numpy()
    diff = np.abs(ours.hist.counts - counts)
    assert diff.max() <= 2.0 and diff.sum() <= 1e-3 * counts.sum()
    assert ours.hist.counts.sum() == pytest.approx(counts.sum())

    lo, hi = ours.min_max_range()
    rlo, rhi = ref._non_linear_param_search()
    # end to end: within one histogram bin (the re-binning difference can move the search's
    # stopping point by a bin)
    assert abs(float(lo) - float(rlo)) <= 1.001 * width
    assert abs(float(hi) - float(rhi)) <= 1.001 * width
    # the search itself, on the same histogram: the same bins
    ref.histogram.copy_(torch.from_numpy(ours.hist.counts).float())
    rlo, rhi = ref._non_linear_param_search()
    np.testing.assert_allclose([float(lo), float(hi)], [float(rlo), float(rhi)], rtol=1e-6,
                               atol=1e-6 * width)
    if not symmetric:  # affine parameters have the same definition in both
        s, zp = ours.calculate_qparams()
        rs, rzp = ref.calculate_qparams()
        np.testing.assert_allclose(float(s), float(rs), rtol=1e-5)
        assert abs(int(zp) - int(rzp)) <= 1


def test_histogram_single_batch_exact_vs_torch():
    x = _batches("laplace", 7, shape=(64, 300), n=1)[0]
    ours = _feed(O.HistogramObserver("int8", symmetric=False), [x])
    ref = _feed(tao.HistogramObserver(dtype=torch.qint8), [x])
    np.testing.assert_array_equal(ours.hist.counts, ref.histogram.numpy())
    lo, hi = ours.min_max_range()
    rlo, rhi = ref._non_linear_param_search()
    np.testing.assert_allclose([float(lo), float(hi)], [float(rlo), float(rhi)], rtol=1e-6)
    assert float(hi) - float(lo) < float(x.max() - x.min())  # it clipped the tails


@pytest.mark.parametrize("n", [100_000, 1_000_000])
def test_histogram_round_totals_match_torch(n):
    """With a round element count the quantile targets land on whole counts: the comparisons
    must round like torch.ao's (float32) to stop on the same bins."""
    x = torch.from_numpy(np.random.default_rng(n).laplace(size=n).astype(np.float32))
    ours = _feed(O.HistogramObserver("int8", symmetric=False), [x])
    ref = _feed(tao.HistogramObserver(dtype=torch.qint8), [x])
    lo, hi = ours.min_max_range()
    rlo, rhi = ref._non_linear_param_search()
    np.testing.assert_allclose([float(lo), float(hi)], [float(rlo), float(rhi)], rtol=1e-6)


def test_histogram_int4_clips_more_than_int8():
    x = _batches("laplace", 8, shape=(64, 300), n=1)[0]
    r8 = _feed(O.HistogramObserver("int8"), [x]).min_max_range()
    r4 = _feed(O.HistogramObserver("int4"), [x]).min_max_range()
    assert float(r4[1] - r4[0]) < float(r8[1] - r8[0])


# ----------------------------------------------------------------------- KL: from-spec reference
def ref_kl_threshold_bin_loops(hist, levels: int, start: int) -> int:
    """TensorRT entropy calibration written out with plain loops: for every candidate i,
    P = hist[:i] with the outliers folded into P[i-1]; Q = hist[:i] merged into `levels`
    levels (bin k -> level k*levels//i) and expanded over the bins where P is nonzero;
    KL(P||Q) of the normalized distributions; the smallest KL wins, ties to the larger i."""
    hist = [float(h) for h in hist]
    n = len(hist)
    best_i, best = n, math.inf
    for i in range(start, n + 1):
        p = hist[:i]
        p[i - 1] += sum(hist[i:])
        mass = [0.0] * levels
        nonzero = [0] * levels
        for k in range(i):
            lev = k * levels // i
            mass[lev] += hist[k]
            nonzero[lev] += p[k] > 0
        q = [mass[k * levels // i] / nonzero[k * levels // i] if p[k] > 0 else 0.0
             for k in range(i)]
        sp, sq = sum(p), sum(q)
        kl, finite = 0.0, sq > 0
        for k in range(i):
            if p[k] > 0:
                if q[k] == 0:
                    finite = False
                    break
                kl += p[k] / sp * math.log((p[k] / sp) / (q[k] / sq))
        if finite and kl <= best:
            best_i, best = i, kl
    return best_i


def ref_kl_threshold_bin_numpy(hist, levels: int, start: int) -> int:
    """The same definition, vectorized per candidate with bincount (for 2048 bins)."""
    hist = np.asarray(hist, np.float64)
    n = hist.size
    best_i, best = n, math.inf
    for i in range(start, n + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        lev = np.arange(i) * levels // i
        mass = np.bincount(lev, weights=hist[:i], minlength=levels)
        nzc = np.bincount(lev, weights=(p > 0).astype(np.float64), minlength=levels)
        nz = p > 0
        q = np.zeros(i)
        q[nz] = mass[lev[nz]] / nzc[lev[nz]]
        if q.sum() == 0 or (q[nz] == 0).any():
            continue
        pn, qn = p[nz] / p.sum(), q[nz] / q.sum()
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl <= best:
            best_i, best = i, kl
    return best_i


@pytest.mark.parametrize("kind", ["gauss", "laplace", "outliers", "relu"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_kl_matches_loop_reference(kind, fmt):
    x = _batches(kind, 11, shape=(64, 128), n=1)[0]
    obs = _feed(O.KLObserver(fmt, bins=512, start_bin=128), [x])
    levels = qkern.formats.get(fmt).qmax + 1
    # histogram of |x| over [0, max|x|] as numpy builds it
    a = x.abs().double().numpy().reshape(-1)
    h_np, _ = np.histogram(a, bins=512, range=(0.0, a.max()))
    np.testing.assert_allclose(obs.histogram.numpy(), h_np, atol=1.0)
    m = ref_kl_threshold_bin_loops(obs.histogram.numpy(), levels, 128)
    assert O.kl_threshold_bin(obs.histogram.numpy(), levels, 128) == m
    width = a.max() / 512
    t = min((m + 0.5) * width, a.max())
    lo, hi = obs.min_max_range()
    np.testing.assert_allclose([float(lo), float(hi)], [-t, t], rtol=1e-6)
    # from numpy's own histogram the same threshold (or a neighbouring bin, if a count moved)
    assert abs(ref_kl_threshold_bin_loops(h_np, levels, 128) - m) <= 1


@pytest.mark.parametrize("kind", ["gauss", "outliers"])
def test_kl_default_2048_bins_matches_reference(kind):
    batches = _batches(kind, 12, shape=(64, 256), n=3)
    batches[0][0, 0] = 1.5 * max(float(b.abs().max()) for b in batches)  # range fixed at once
    obs = _feed(O.KLObserver("int8"), batches)
    a = torch.cat([b.reshape(-1) for b in batches]).abs().double().numpy()
    h_np, _ = np.histogram(a, bins=2048, range=(0.0, a.max()))
    np.testing.assert_allclose(obs.histogram.numpy(), h_np, atol=1.0)  # no re-binning needed
    m = ref_kl_threshold_bin_numpy(obs.histogram.numpy(), 128, 128)
    t = min((m + 0.5) * a.max() / 2048, a.max())
    _, hi = obs.min_max_range()
    np.testing.assert_allclose(float(hi), t, rtol=1e-6)
    assert float(hi) < a.max()  # the outlier is clipped
    s, zp = obs.calculate_qparams()
    assert zp is None and float(s) == pytest.approx(t / 127, rel=1e-6)


def test_kl_rebinning_close_to_one_histogram():
    """Batches that widen the range give nearly the threshold of one histogram of everything."""
    batches = _batches("laplace", 13, shape=(64, 256), n=4)
    batches = [b * (1 + 0.3 * i) for i, b in enumerate(batches)]
    obs = _feed(O.KLObserver("int8"), batches)
    a = torch.cat([b.reshape(-1) for b in batches]).abs().double().numpy()
    h_np, _ = np.histogram(a, bins=2048, range=(0.0, a.max()))
    assert obs.histogram.sum().item() == pytest.approx(a.size)
    t_ref = (ref_kl_threshold_bin_numpy(h_np, 128, 128) + 0.5) * a.max() / 2048
    _, hi = obs.min_max_range()
    assert float(hi) == pytest.approx(min(t_ref, a.max()), rel=0.05)


# ----------------------------------------------------------------------------------- percentile
@pytest.mark.parametrize("p", [99.0, 99.99, 100.0, 75.5])
def test_percentile_matches_numpy(p):
    batches = _batches("outliers", 14, shape=(8, 50), n=3)
    x = torch.cat([b.reshape(-1) for b in batches]).double().numpy()
    sym = _feed(O.PercentileObserver(percentile=p), batches)
    lo, hi = sym.min_max_range()
    a = np.percentile(np.abs(x), p)
    np.testing.assert_allclose([float(lo), float(hi)], [-a, a], rtol=1e-6)
    asym = _feed(O.PercentileObserver("uint8", symmetric=False, percentile=p), batches)
    lo, hi = asym.min_max_range()
    np.testing.assert_allclose([float(lo), float(hi)],
                               [np.percentile(x, 100 - p), np.percentile(x, p)], rtol=1e-6)


def test_percentile_per_channel_matches_numpy():
    batches = _batches("laplace", 15, shape=(5, 12, 9), n=3)
    obs = _feed(O.PercentileObserver(percentile=99.5, granularity="channel", axis=1,
                                     symmetric=False), batches)
    x = torch.cat([b.movedim(1, 0).reshape(12, -1) for b in batches], 1).double().numpy()
    lo, hi = obs.min_max_range()
    np.testing.assert_allclose(lo.numpy(), np.percentile(x, 0.5, axis=1), rtol=1e-6)
    np.testing.assert_allclose(hi.numpy(), np.percentile(x, 99.5, axis=1), rtol=1e-6)
    sym = _feed(O.PercentileObserver(percentile=99.5, granularity="channel", axis=1), batches)
    np.testing.assert_allclose(sym.min_max_range()[1].numpy(),
                               np.percentile(np.abs(x), 99.5, axis=1), rtol=1e-6)


def test_percentile_subsampled_is_close():
    g = np.random.default_rng(16)
    batches = [torch.from_numpy(g.standard_normal(20000).astype(np.float32)) for _ in range(5)]
    obs = _feed(O.PercentileObserver(percentile=99.0, max_samples=20000), batches)
    assert obs.samples.data.shape[1] == 20000 and not obs.samples.complete
    x = torch.cat(batches).numpy()
    assert float(obs.min_max_range()[1]) == pytest.approx(np.percentile(np.abs(x), 99), rel=0.03)


# ------------------------------------------------------------------------------------------ MSE
def _mse(x, obs, fmt, symmetric, granularity, axis=0):
    kw = obs.quant_kwargs()
    q = qkern.quantize(x, fmt, **kw)
    assert kw["symmetric"] == symmetric and kw["granularity"] == granularity
    err = (q.dequantize().double() - x.double()) ** 2
    if granularity == "channel":
        return err.movedim(axis, 0).reshape(x.shape[axis], -1).mean(1)
    return err.mean().reshape(1)


@pytest.mark.parametrize("kind", ["gauss", "laplace", "outliers"])
@pytest.mark.parametrize("fmt,symmetric", [("int8", True), ("int4", True), ("uint4", False),
                                           ("int3", False), ("fp8_e4m3", True), ("nf4", True)])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_mse_never_worse_than_minmax(kind, fmt, symmetric, granularity):
    batches = _batches(kind, 17, shape=(12, 80), n=3)
    x = torch.cat(batches, 1)
    kw = {"symmetric": symmetric, "granularity": granularity, "axis": 0}
    mse_obs = _feed(O.MSEObserver(fmt, num_candidates=40, **kw), batches)
    mm_obs = _feed(O.MinMaxObserver(fmt, **kw), batches)
    e_mse = _mse(x, mse_obs, fmt, symmetric, granularity)
    e_mm = _mse(x, mm_obs, fmt, symmetric, granularity)
    assert (e_mse <= e_mm).all(), (e_mse, e_mm)
    lo, hi = mse_obs.min_max_range()
    mlo, mhi = mm_obs.min_max_range()
    assert (hi <= mhi).all() and (lo >= mlo).all()  # it only ever shrinks the range
    if fmt in ("int4", "uint4", "int3", "nf4"):
        if kind == "laplace":  # heavy tails at low bit widths: clipping helps every channel
            assert (e_mse < e_mm).all()
            assert e_mse.sum() < 0.9 * e_mm.sum()
        elif kind == "outliers":  # a few huge values: clipping them costs, but still helps
            assert e_mse.sum() < e_mm.sum()


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(x=arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 40)),
                elements=st.floats(-1e4, 1e4, width=32) | st.sampled_from([0.0, 1e-30, 7.0])),
       fmt=st.sampled_from(["int8", "int4", "uint3", "int2", "fp8_e4m3", "nf4"]),
       symmetric=st.booleans(), granularity=st.sampled_from(["tensor", "channel"]))
def test_mse_never_worse_than_minmax_property(x, fmt, symmetric, granularity):
    if fmt in ("fp8_e4m3", "nf4"):
        symmetric = True
    x = torch.from_numpy(x)
    kw = {"symmetric": symmetric, "granularity": granularity}
    mse_obs = _feed(O.MSEObserver(fmt, num_candidates=12, **kw), [x])
    mm_obs = _feed(O.MinMaxObserver(fmt, **kw), [x])
    e_mse = _mse(x, mse_obs, fmt, symmetric, granularity)
    e_mm = _mse(x, mm_obs, fmt, symmetric, granularity)
    assert (e_mse <= e_mm).all()
    scale, _ = mse_obs.calculate_qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all()


@pytest.mark.parametrize("kind", ["laplace", "outliers"])
def test_mse_strictly_better_on_heavy_tails_int8(kind):
    x = _batches(kind, 18, shape=(64, 512), n=1)[0]
    mse_obs = _feed(O.MSEObserver("int8"), [x])
    mm_obs = _feed(O.MinMaxObserver("int8"), [x])
    e_mse = _mse(x, mse_obs, "int8", True, "tensor")
    e_mm = _mse(x, mm_obs, "int8", True, "tensor")
    assert float(e_mse) < 0.95 * float(e_mm)
    assert mse_obs.best_ratio.item() < 1.0


def test_mse_ratio_grid_and_minmax_candidate():
    obs = O.MSEObserver(num_candidates=5, min_ratio=0.6)
    np.testing.assert_allclose(obs.ratios, [1.0, 0.9, 0.8, 0.7, 0.6])
    assert obs.ratios[0] == 1.0
    # uniform data: no clipping helps, so the answer is exactly the min/max range
    x = torch.linspace(-1, 1, 255)
    _feed(obs, [x])
    lo, hi = obs.min_max_range()
    assert float(lo) == -1.0 and float(hi) == 1.0


# ------------------------------------------------------------------------------------------ LSQ
def test_lsq_init_and_forward_equal_qkern():
    x = _batches("laplace", 19, shape=(6, 40), n=1)[0]
    obs = O.LSQObserver("int4")
    obs(x)
    exp = np.float32(2 * np.abs(x.double().numpy()).mean() / math.sqrt(7))
    np.testing.assert_allclose(float(obs.scale.detach()), exp, rtol=1e-6)
    y = obs.fake_quantize(x)
    ref = qkern.quantize(x, "int4", scale=obs.scale.detach()).dequantize()
    assert torch.equal(y, ref)
    s, zp = obs.calculate_qparams()
    assert zp is None and float(s) == float(obs.scale.detach())
    ch = O.LSQObserver("int8", granularity="channel", axis=1)
    ch(x)
    exp = 2 * np.abs(x.double().numpy()).mean(0) / math.sqrt(127)
    np.testing.assert_allclose(ch.scale.detach().numpy(), exp, rtol=1e-6)
    y = ch.fake_quantize(x)
    ref = qkern.quantize(x, "int8", granularity="channel", axis=1,
                         scale=ch.scale.detach()).dequantize()
    assert torch.equal(y, ref)


def test_lsq_gradient_hand_example():
    """int4 (Q_N = 8, Q_P = 7), s = 0.5, v = [0.3, -1.7, 5.0, 0.05, -6.0]:
    v/s = [0.6, -3.4, 10, 0.1, -12] -> d v_hat/d s = [1 - 0.6, -3 + 3.4, 7, 0 - 0.1, -8]
    = [0.4, 0.4, 7, -0.1, -8]; with L = sum(v_hat), dL/ds = g * sum = g * -0.3,
    g = 1/sqrt(5 * 7); dL/dv = [1, 1, 0, 1, 0] (straight-through inside the range)."""
    obs = O.LSQObserver("int4")
    v = torch.tensor([0.3, -1.7, 5.0, 0.05, -6.0], requires_grad=True)
    obs(v)
    with torch.no_grad():
        obs.scale.fill_(0.5)
    y = obs.fake_quantize(v)
    np.testing.assert_allclose(y.detach().numpy(), [0.5, -1.5, 3.5, 0.0, -4.0])
    y.sum().backward()
    assert obs.scale.grad.item() == pytest.approx(-0.3 / math.sqrt(35), rel=1e-5)
    np.testing.assert_array_equal(v.grad.numpy(), [1, 1, 0, 1, 0])


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_lsq_gradient_matches_paper_formula(granularity):
    g = np.random.default_rng(20)
    v = g.standard_normal((5, 33)).astype(np.float32) * 3
    w = g.standard_normal((5, 33))  # upstream gradient dL/dv_hat
    obs = O.LSQObserver("int4", granularity=granularity)
    vt = torch.from_numpy(v).requires_grad_(True)
    obs(vt)
    y = obs.fake_quantize(vt)
    (y.double() * torch.from_numpy(w)).sum().backward()
    s = obs.scale.detach().double().numpy().reshape(-1, 1) if granularity == "channel" else \
        float(obs.scale.detach())
    q_n, q_p = 8, 7
    t = v.astype(np.float64) / s
    dvds = np.where(t <= -q_n, -q_n, np.where(t >= q_p, q_p, np.round(t) - t))
    if granularity == "channel":
        exp = (w * dvds).sum(1) / math.sqrt(33 * q_p)
        np.testing.assert_allclose(obs.scale.grad.numpy(), exp, rtol=1e-4, atol=1e-6)
    else:
        exp = (w * dvds).sum() / math.sqrt(v.size * q_p)
        assert obs.scale.grad.item() == pytest.approx(exp, rel=1e-4)
    inside = (t > -q_n) & (t < q_p)
    np.testing.assert_allclose(vt.grad.numpy(), np.where(inside, w, 0.0), rtol=1e-6)


def test_lsq_training_finds_the_mse_optimal_scale():
    """From 4x the LSQ initial scale, Adam on the quantization MSE reaches the scale a fine grid
    search finds (LSQ's gradient points the right way and its STE does not stall)."""
    x = _batches("laplace", 21, shape=(32, 64), n=1)[0]
    obs = O.LSQObserver("int3")
    obs(x)
    init = float(obs.scale.detach())

    def loss_at(s):
        return float(qkern.quantize(x, "int3", scale=s).dequantize().sub(x).square().mean())

    grid = np.linspace(0.2, 2.0, 91) * init
    errs = [loss_at(float(s)) for s in grid]
    with torch.no_grad():
        obs.scale.fill_(4 * init)
    first = loss_at(4 * init)
    opt = torch.optim.Adam(obs.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        loss = (obs.fake_quantize(x) - x).square().mean()
        loss.backward()
        opt.step()
    final = float(obs.scale.detach())
    assert loss_at(final) < 0.2 * first
    assert loss_at(final) <= 1.01 * min(errs)
    assert final == pytest.approx(grid[int(np.argmin(errs))], rel=0.05)


# ----------------------------------------------------------------------- contract and errors
ALL = list(O.OBSERVERS)


@pytest.mark.parametrize("name", ALL)
def test_no_data_error_and_reset(name):
    obs = O.make_observer(name, fmt="int8")
    with pytest.raises(RuntimeError, match="observer has seen no data: run calibration first"):
        obs.calculate_qparams()
    x = _batches("laplace", 22, n=1)[0]
    obs(x)
    first = obs.calculate_qparams()[0].clone()
    obs(x * 10)
    obs.reset()
    with pytest.raises(RuntimeError, match="seen no data"):
        obs.min_max_range()
    obs(x)
    assert torch.equal(obs.calculate_qparams()[0], first)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_is_value_error(name, bad):
    obs = O.make_observer(name)
    x = torch.randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(ValueError, match=r"observed tensor contains 1 NaN/Inf value.*\(2, 3\)"):
        obs(x)
    assert int(obs.num_batches) == 0


@pytest.mark.parametrize("name", ALL)
def test_all_zero_input_gives_positive_finite_scale(name):
    obs = O.make_observer(name)
    obs(torch.zeros(16, 16))
    scale, _ = obs.calculate_qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(obs.quantize(torch.zeros(16, 16)).dequantize(), torch.zeros(16, 16))


@pytest.mark.parametrize("name", ["minmax", "moving_average", "percentile", "mse", "lsq"])
def test_per_channel_with_a_zero_channel(name):
    x = torch.randn(4, 10)
    x[2] = 0
    obs = O.make_observer(name, granularity="channel")
    obs(x)
    scale, _ = obs.calculate_qparams()
    assert scale.shape == (4,) and torch.isfinite(scale).all() and (scale > 0).all()
    assert float(scale[2]) == 1.0
    assert obs.quantize(x).dequantize()[2].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_inputs(dtype):
    x = torch.randn(8, 16)
    obs = O.MinMaxObserver()
    y = x.to(dtype)
    assert obs(y) is y
    assert float(obs.min_max_range()[1]) == float(y.float().max())


def test_observer_in_a_model_passes_values_and_gradients():
    obs = O.MinMaxObserver()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), obs, torch.nn.ReLU())
    x = torch.randn(4, 8)
    y = model(x)
    ref = torch.relu(model[0](x))
    assert torch.equal(y, ref)
    y.sum().backward()
    assert model[0].weight.grad is not None
    assert int(obs.num_batches) == 1
    assert set(obs.state_dict()) == {"num_batches", "min_val", "max_val"}
    assert obs(torch.empty(0, 8)).shape == (0, 8) and int(obs.num_batches) == 1


def test_registry():
    assert set(O.OBSERVERS) == {"minmax", "moving_average", "percentile", "mse", "kl",
                                "histogram", "lsq"}
    for name, cls in O.OBSERVERS.items():
        obs = O.make_observer(name, fmt="int4")
        assert type(obs) is cls and obs.format.name == "int4"
    with pytest.raises(ValueError, match="unknown observer 'entropy'; choose one of minmax"):
        O.make_observer("entropy")
    assert "fmt=int4" in repr(O.make_observer("kl", fmt="int4"))
    assert qkern.observers is O


@pytest.mark.parametrize("cls,kw,field", [
    (O.MinMaxObserver, {"fmt": 3}, "fmt"),
    (O.MinMaxObserver, {"fmt": "int9"}, "unknown format"),
    (O.MinMaxObserver, {"fmt": "mxfp4"}, "mxfp4"),
    (O.MinMaxObserver, {"fmt": "ternary"}, "ternary"),
    (O.MinMaxObserver, {"fmt": "fp8_e4m3", "symmetric": False}, "symmetric only"),
    (O.MinMaxObserver, {"fmt": "int1"}, "int1"),
    (O.MinMaxObserver, {"symmetric": "yes"}, "symmetric"),
    (O.MinMaxObserver, {"granularity": "group"}, "granularity"),
    (O.MinMaxObserver, {"axis": 1.0}, "axis"),
    (O.MovingAverageMinMaxObserver, {"averaging_constant": 0.0}, "averaging_constant"),
    (O.MovingAverageMinMaxObserver, {"averaging_constant": "0.1"}, "averaging_constant"),
    (O.MovingAverageMinMaxObserver, {"averaging_constant": float("nan")},
     "averaging_constant"),
    (O.PercentileObserver, {"percentile": 100.5}, "percentile"),
    (O.PercentileObserver, {"percentile": 50}, "percentile"),
    (O.PercentileObserver, {"max_samples": 0}, "max_samples"),
    (O.MSEObserver, {"num_candidates": 0}, "num_candidates"),
    (O.MSEObserver, {"num_candidates": True}, "num_candidates"),
    (O.MSEObserver, {"min_ratio": 1.0}, "min_ratio"),
    (O.MSEObserver, {"seed": -1}, "seed"),
    (O.KLObserver, {"start_bin": 64}, "start_bin"),
    (O.KLObserver, {"bins": 100}, "bins"),
    (O.KLObserver, {"symmetric": False}, "symmetric"),
    (O.KLObserver, {"fmt": "fp8_e4m3"}, "fp8_e4m3"),
    (O.KLObserver, {"granularity": "channel"}, "per-tensor only"),
    (O.HistogramObserver, {"granularity": "channel"}, "per-tensor only"),
    (O.HistogramObserver, {"bins": 2048.0}, "bins"),
    (O.HistogramObserver, {"fmt": "nf4"}, "nf4"),
    (O.LSQObserver, {"symmetric": False}, "symmetric"),
    (O.LSQObserver, {"fmt": "fp8_e4m3"}, "fp8_e4m3"),
])
def test_bad_config_is_value_error_naming_it(cls, kw, field):
    with pytest.raises(ValueError, match=field):
        cls(**kw)


def test_bad_inputs():
    obs = O.MinMaxObserver(granularity="channel", axis=1)
    with pytest.raises(TypeError, match="floating"):
        obs(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        obs([1.0, 2.0])
    with pytest.raises(ValueError, match="out of range"):
        obs(torch.ones(4))
    obs(torch.ones(2, 4))
    with pytest.raises(ValueError, match="5 channels along axis 1; this observer has seen 4"):
        obs(torch.ones(2, 5))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        O.MinMaxObserver(granularity="channel")(torch.tensor(1.0))
