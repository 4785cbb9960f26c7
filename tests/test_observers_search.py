"""qkern.observers' range searches against independent references: numpy.percentile, a
from-spec numpy KL (TensorRT entropy) calibrator, MSE against MinMax, and the LSQ paper's
gradient formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import qkern
from observer_data import feed, make_batches, ref_kl_threshold_bin_numpy
from qkern import observers as O


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


@pytest.mark.parametrize("kind", ["gauss", "laplace", "outliers", "relu"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_kl_matches_loop_reference(kind, fmt):
    x = make_batches(kind, 11, shape=(64, 128), n=1)[0]
    obs = feed(O.KLObserver(fmt, bins=512, start_bin=128), [x])
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
    batches = make_batches(kind, 12, shape=(64, 256), n=3)
    batches[0][0, 0] = 1.5 * max(float(b.abs().max()) for b in batches)  # range fixed at once
    obs = feed(O.KLObserver("int8"), batches)
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
    batches = make_batches("laplace", 13, shape=(64, 256), n=4)
    batches = [b * (1 + 0.3 * i) for i, b in enumerate(batches)]
    obs = feed(O.KLObserver("int8"), batches)
    a = torch.cat([b.reshape(-1) for b in batches]).abs().double().numpy()
    h_np, _ = np.histogram(a, bins=2048, range=(0.0, a.max()))
    assert obs.histogram.sum().item() == pytest.approx(a.size)
    t_ref = (ref_kl_threshold_bin_numpy(h_np, 128, 128) + 0.5) * a.max() / 2048
    _, hi = obs.min_max_range()
    assert float(hi) == pytest.approx(min(t_ref, a.max()), rel=0.05)


# ----------------------------------------------------------------------------------- percentile
@pytest.mark.parametrize("p", [99.0, 99.99, 100.0, 75.5])
def test_percentile_matches_numpy(p):
    batches = make_batches("outliers", 14, shape=(8, 50), n=3)
    x = torch.cat([b.reshape(-1) for b in batches]).double().numpy()
    sym = feed(O.PercentileObserver(percentile=p), batches)
    lo, hi = sym.min_max_range()
    a = np.percentile(np.abs(x), p)
    np.testing.assert_allclose([float(lo), float(hi)], [-a, a], rtol=1e-6)
    asym = feed(O.PercentileObserver("uint8", symmetric=False, percentile=p), batches)
    lo, hi = asym.min_max_range()
    np.testing.assert_allclose([float(lo), float(hi)],
                               [np.percentile(x, 100 - p), np.percentile(x, p)], rtol=1e-6)


def test_percentile_per_channel_matches_numpy():
    batches = make_batches("laplace", 15, shape=(5, 12, 9), n=3)
    obs = feed(O.PercentileObserver(percentile=99.5, granularity="channel", axis=1,
                                     symmetric=False), batches)
    x = torch.cat([b.movedim(1, 0).reshape(12, -1) for b in batches], 1).double().numpy()
    lo, hi = obs.min_max_range()
    np.testing.assert_allclose(lo.numpy(), np.percentile(x, 0.5, axis=1), rtol=1e-6)
    np.testing.assert_allclose(hi.numpy(), np.percentile(x, 99.5, axis=1), rtol=1e-6)
    sym = feed(O.PercentileObserver(percentile=99.5, granularity="channel", axis=1), batches)
    np.testing.assert_allclose(sym.min_max_range()[1].numpy(),
                               np.percentile(np.abs(x), 99.5, axis=1), rtol=1e-6)


def test_percentile_subsampled_is_close():
    g = np.random.default_rng(16)
    batches = [torch.from_numpy(g.standard_normal(20000).astype(np.float32)) for _ in range(5)]
    obs = feed(O.PercentileObserver(percentile=99.0, max_samples=20000), batches)
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
    batches = make_batches(kind, 17, shape=(12, 80), n=3)
    x = torch.cat(batches, 1)
    kw = {"symmetric": symmetric, "granularity": granularity, "axis": 0}
    mse_obs = feed(O.MSEObserver(fmt, num_candidates=40, **kw), batches)
    mm_obs = feed(O.MinMaxObserver(fmt, **kw), batches)
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
    mse_obs = feed(O.MSEObserver(fmt, num_candidates=12, **kw), [x])
    mm_obs = feed(O.MinMaxObserver(fmt, **kw), [x])
    e_mse = _mse(x, mse_obs, fmt, symmetric, granularity)
    e_mm = _mse(x, mm_obs, fmt, symmetric, granularity)
    assert (e_mse <= e_mm).all()
    scale, _ = mse_obs.calculate_qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all()


@pytest.mark.parametrize("kind", ["laplace", "outliers"])
def test_mse_strictly_better_on_heavy_tails_int8(kind):
    x = make_batches(kind, 18, shape=(64, 512), n=1)[0]
    mse_obs = feed(O.MSEObserver("int8"), [x])
    mm_obs = feed(O.MinMaxObserver("int8"), [x])
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
    feed(obs, [x])
    lo, hi = obs.min_max_range()
    assert float(lo) == -1.0 and float(hi) == 1.0


# ------------------------------------------------------------------------------------------ LSQ
def test_lsq_init_and_forward_equal_qkern():
    x = make_batches("laplace", 19, shape=(6, 40), n=1)[0]
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


def test_lsq_plus_observer_asymmetric():
    """make_observer("lsq", fmt="uint8", symmetric=False): LSQ+ (Bhalgat et al. 2020) with a
    learned offset; the forward is round(clamp((x - beta) / s, 0, 255)) s + beta (numpy here),
    the MSE init beats the min/max range on outlier-heavy data, the offset gets the paper's
    gradient (g times the count of clamped elements, 0 inside), and calculate_qparams gives
    the nearest integer zero point."""
    torch.manual_seed(0)
    x = torch.cat([torch.rand(2000) * 3 - 0.3, torch.tensor([9.0, -1.5])]).reshape(1, -1)
    obs = O.make_observer("lsq", fmt="uint8", symmetric=False)
    obs(x)
    s, b = float(obs.scale.detach()), float(obs.offset.detach())
    xs = x.numpy().astype(np.float32)
    t = (xs - np.float32(b)) * np.float32(1 / np.float32(s))
    ref = np.clip(np.round(t), 0, 255) * np.float32(s) + np.float32(b)
    y = obs.fake_quantize(x.clone().requires_grad_())
    np.testing.assert_allclose(y.detach().numpy(), ref, atol=1e-5 * s)
    mm_s = float(x.max() - x.min()) / 255
    mm = ((xs - float(x.min())) / mm_s).round().clip(0, 255) * mm_s + float(x.min())
    assert float(((ref - xs) ** 2).mean()) <= float(((mm - xs) ** 2).mean())
    y.sum().backward()
    clamped = (t < 0) | (t > 255)
    g = 1 / math.sqrt(x.numel() * 255)
    np.testing.assert_allclose(float(obs.offset.grad), g * float(clamped.sum()), rtol=1e-5)
    scale, zp = obs.calculate_qparams()
    assert float(scale) == s and int(zp) == int(np.clip(np.round(-b / s), 0, 255))


def test_lsq_observer_selectable_in_configs():
    from qkern.quantization import StaticConfig, quantize_model

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(32, 16)
    for sym in (True, False):
        q = quantize_model(model, StaticConfig(observer="lsq", act_symmetric=sym), [x])
        with torch.no_grad():
            err = float((q(x) - model(x)).abs().max() / model(x).abs().max())
        assert err < 0.1


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
    x = make_batches("laplace", 21, shape=(32, 64), n=1)[0]
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
