"""qkern.observers against independent references: torch.ao's observers on the same batches
(MinMax, moving average, histogram), and the observers' contract and errors (the range
searches, KL / percentile / MSE / LSQ, are in test_observers_search.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.ao.quantization import observer as tao

import qkern
from observer_data import feed, make_batches
from qkern import observers as O

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
    x = make_batches("outliers", 1)[0]
    if fmt.startswith("uint") and symmetric:
        x = x.abs()
    obs = feed(O.MinMaxObserver(fmt, symmetric=symmetric, granularity=granularity), [x])
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
    batches = make_batches(kind, 2)
    ours = feed(O.MinMaxObserver(fmt, symmetric=False), batches)
    ref = feed(tao.MinMaxObserver(dtype=dtype, qscheme=torch.per_tensor_affine), batches)
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
    batches = make_batches(kind, 3)
    ours = feed(O.MinMaxObserver("int8"), batches)
    ref = feed(tao.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
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
    ours = feed(O.MinMaxObserver(fmt, symmetric=False, granularity="channel", axis=axis),
                 batches)
    ref = feed(tao.PerChannelMinMaxObserver(ch_axis=axis % len(shape), dtype=dtype,
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
    batches = make_batches(kind, 5, n=6)
    ours = feed(O.MovingAverageMinMaxObserver("uint8", symmetric=False, averaging_constant=c),
                 batches)
    ref = feed(tao.MovingAverageMinMaxObserver(averaging_constant=c, dtype=torch.quint8),
                batches)
    lo, hi = ours.min_max_range()
    np.testing.assert_allclose(float(lo), float(ref.min_val), rtol=1e-6)
    np.testing.assert_allclose(float(hi), float(ref.max_val), rtol=1e-6)
    s, zp = ours.calculate_qparams()
    rs, rzp = ref.calculate_qparams()
    np.testing.assert_allclose(float(s), float(rs), rtol=1e-6)
    assert abs(int(zp) - int(rzp)) <= 1

    och = feed(O.MovingAverageMinMaxObserver("int8", symmetric=False, averaging_constant=c,
                                              granularity="channel", axis=1), batches)
    rch = feed(tao.MovingAveragePerChannelMinMaxObserver(averaging_constant=c, ch_axis=1,
                                                          dtype=torch.qint8,
                                                          qscheme=torch.per_channel_affine),
                batches)
    lo, hi = och.min_max_range()
    np.testing.assert_allclose(lo.numpy(), rch.min_val.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(hi.numpy(), rch.max_val.numpy(), rtol=1e-6, atol=1e-7)


def test_moving_average_formula():
    obs = O.MovingAverageMinMaxObserver(averaging_constant=0.25)
    feed(obs, [torch.tensor([-1.0, 2.0]), torch.tensor([-5.0, 6.0]), torch.tensor([0.0, 2.0])])
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
    batches = make_batches(kind, seed, shape=(32, 257))
    ours = feed(O.HistogramObserver(fmt, symmetric=symmetric), batches)
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    ref = feed(tao.HistogramObserver(dtype=dtype, qscheme=qscheme), batches)
    assert ours.hist.lo[0] == float(ref.min_val) and ours.hist.hi[0] == float(ref.max_val)
    width = float(ours.hist.width[0])
    # the accumulated histograms agree up to the re-binning of widened ranges (float64 here,
    # float32 in torch, so a sub-bin midpoint can land in the neighbouring bin)
    counts = ref.histogram.double().numpy()
    diff = np.abs(ours.hist.counts[0] - counts)
    assert diff.max() <= 2.0 and diff.sum() <= 1e-3 * counts.sum()
    assert ours.hist.counts.sum() == pytest.approx(counts.sum())

    lo, hi = ours.min_max_range()
    rlo, rhi = ref._non_linear_param_search()
    # end to end: within one histogram bin (the re-binning difference can move the search's
    # stopping point by a bin)
    assert abs(float(lo) - float(rlo)) <= 1.001 * width
    assert abs(float(hi) - float(rhi)) <= 1.001 * width
    # the search itself, on the same histogram: the same bins
    ref.histogram.copy_(torch.from_numpy(ours.hist.counts[0]).float())
    rlo, rhi = ref._non_linear_param_search()
    np.testing.assert_allclose([float(lo), float(hi)], [float(rlo), float(rhi)], rtol=1e-6,
                               atol=1e-6 * width)
    if not symmetric:  # affine parameters have the same definition in both
        s, zp = ours.calculate_qparams()
        rs, rzp = ref.calculate_qparams()
        np.testing.assert_allclose(float(s), float(rs), rtol=1e-5)
        assert abs(int(zp) - int(rzp)) <= 1


def test_histogram_single_batch_exact_vs_torch():
    x = make_batches("laplace", 7, shape=(64, 300), n=1)[0]
    ours = feed(O.HistogramObserver("int8", symmetric=False), [x])
    ref = feed(tao.HistogramObserver(dtype=torch.qint8), [x])
    np.testing.assert_array_equal(ours.hist.counts[0], ref.histogram.numpy())
    lo, hi = ours.min_max_range()
    rlo, rhi = ref._non_linear_param_search()
    np.testing.assert_allclose([float(lo), float(hi)], [float(rlo), float(rhi)], rtol=1e-6)
    assert float(hi) - float(lo) < float(x.max() - x.min())  # it clipped the tails


@pytest.mark.parametrize("n", [100_000, 1_000_000])
def test_histogram_round_totals_match_torch(n):
    """With a round element count the quantile targets land on whole counts: the comparisons
    must round like torch.ao's (float32) to stop on the same bins."""
    x = torch.from_numpy(np.random.default_rng(n).laplace(size=n).astype(np.float32))
    ours = feed(O.HistogramObserver("int8", symmetric=False), [x])
    ref = feed(tao.HistogramObserver(dtype=torch.qint8), [x])
    lo, hi = ours.min_max_range()
    rlo, rhi = ref._non_linear_param_search()
    np.testing.assert_allclose([float(lo), float(hi)], [float(rlo), float(rhi)], rtol=1e-6)


def test_histogram_int4_clips_more_than_int8():
    x = make_batches("laplace", 8, shape=(64, 300), n=1)[0]
    r8 = feed(O.HistogramObserver("int8"), [x]).min_max_range()
    r4 = feed(O.HistogramObserver("int4"), [x]).min_max_range()
    assert float(r4[1] - r4[0]) < float(r8[1] - r8[0])


# ----------------------------------------------------------------------- contract and errors
ALL = list(O.OBSERVERS)


@pytest.mark.parametrize("name", ALL)
def test_no_data_error_and_reset(name):
    obs = O.make_observer(name, fmt="int8")
    with pytest.raises(RuntimeError, match="observer has seen no data: run calibration first"):
        obs.calculate_qparams()
    x = make_batches("laplace", 22, n=1)[0]
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


@pytest.mark.parametrize("name", ALL)
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
                                "histogram", "lsq", "ema", "running_mean"}
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
    (O.KLObserver, {"granularity": "group"}, "granularity"),
    (O.HistogramObserver, {"bins": 2048.0}, "bins"),
    (O.HistogramObserver, {"fmt": "nf4"}, "nf4"),
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
