"""EMA (bias-corrected) and running-mean range observers against a numpy reference of the
recursion written from the definition, and their use by StaticConfig by name."""

import numpy as np
import pytest
import torch

import qkern
import qkern.observers as O
from qkern import quantization as Q


def np_ema(batches, beta, correct, axis=None):
    """m_0 = 0; m_t = beta m_{t-1} + (1 - beta) x_t; range = m_t / (1 - beta^t)."""
    m_lo = m_hi = 0.0
    for t, b in enumerate(batches, 1):
        a = np.asarray(b, dtype=np.float64)
        if axis is None:
            lo, hi = a.min(), a.max()
        else:
            a = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
            lo, hi = a.min(1), a.max(1)
        m_lo = beta * m_lo + (1 - beta) * lo
        m_hi = beta * m_hi + (1 - beta) * hi
    c = 1 - beta ** t if correct else 1.0
    return m_lo / c, m_hi / c


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("correct", [True, False])
@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_ema_matches_numpy_recursion(beta, correct, gran):
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(6, 5, 7, generator=g) * (1 + i) + i * 0.3 for i in range(9)]
    kw = {"granularity": gran, "axis": 1} if gran == "channel" else {}
    obs = O.make_observer("ema", fmt="int8", beta=beta, bias_correction=correct, **kw)
    for b in batches:
        obs(b)
    lo, hi = obs.min_max_range()
    rlo, rhi = np_ema([b.numpy() for b in batches], beta, correct,
                      axis=1 if gran == "channel" else None)
    np.testing.assert_allclose(lo.numpy(), np.float32(rlo), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(hi.numpy(), np.float32(rhi), rtol=1e-6, atol=1e-7)
    # qparams as qkern's symmetric rule from that range: max(|lo|, |hi|) / 127
    scale, zp = obs.calculate_qparams()
    ref = np.maximum(np.abs(np.float32(rlo)), np.abs(np.float32(rhi))) / np.float32(127)
    np.testing.assert_allclose(scale.numpy(), ref, rtol=1e-6)
    assert zp is None


def test_bias_correction_first_batch_is_its_range():
    x = torch.tensor([[-2.0, 0.5, 3.0]])
    obs = O.EMAMinMaxObserver(beta=0.99)
    obs(x)
    assert [float(v) for v in obs.min_max_range()] == [-2.0, 3.0]
    raw = O.EMAMinMaxObserver(beta=0.99, bias_correction=False)
    raw(x)
    lo, hi = raw.min_max_range()  # pulled toward 0 by the zero start
    assert abs(float(hi) - 0.03) < 1e-6 and abs(float(lo) + 0.02) < 1e-6


def test_running_mean_matches_numpy():
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(32, 4, generator=g) * (i + 1) for i in range(7)]
    obs = O.make_observer("running_mean", fmt="uint8", symmetric=False,
                          granularity="channel", axis=-1)
    for b in batches:
        obs(b)
    a = np.stack([b.numpy().astype(np.float64) for b in batches])
    lo, hi = obs.min_max_range()
    np.testing.assert_allclose(lo.numpy(), a.min(1).mean(0), rtol=1e-6)
    np.testing.assert_allclose(hi.numpy(), a.max(1).mean(0), rtol=1e-6)
    scale, zp = obs.calculate_qparams()  # asymmetric: (hi' - lo') / 255, hi' >= 0 >= lo'
    lo0, hi0 = np.minimum(a.min(1).mean(0), 0), np.maximum(a.max(1).mean(0), 0)
    np.testing.assert_allclose(scale.numpy(), (hi0 - lo0) / 255, rtol=1e-5)
    np.testing.assert_array_equal(zp.numpy(), np.clip(-np.round(lo0 / scale.numpy()), 0, 255))


def test_bad_args_and_reset():
    obs = O.EMAMinMaxObserver(beta=0.8, granularity="channel")
    for i in range(3):
        obs(torch.randn(4, 9) * (i + 1))
    obs.reset()
    obs(torch.ones(4, 9))
    assert torch.equal(obs.min_max_range()[1], torch.ones(4))  # the correction restarts
    for bad in (1.0, -0.1, "0.9", float("nan")):
        with pytest.raises(ValueError, match="beta must"):
            O.EMAMinMaxObserver(beta=bad)
    with pytest.raises(ValueError, match="bias_correction must be a bool"):
        O.EMAMinMaxObserver(bias_correction=1)


def test_static_config_takes_the_observers_by_name():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 16, generator=g) * (1 + 3 * (i == 2)) for i in range(4)]
    scales = {}
    for name in ("minmax", "ema", "running_mean"):
        q = Q.quantize_model(model, Q.StaticConfig(observer=name, act_fmt="int8"), batches)
        scales[name] = float(q[0].act_scale)
        assert q(batches[0]).shape == (8, 4)
    # the reference: first layer's input range per batch, averaged / EMA'd
    amax = np.array([float(b.abs().max()) for b in batches])
    hi = np.array([float(b.max()) for b in batches])
    lo = np.array([float(b.min()) for b in batches])
    rlo, rhi = np_ema([b.numpy() for b in batches], 0.9, True)
    want = {"minmax": amax.max() / 127, "running_mean":
            max(abs(lo.mean()), abs(hi.mean())) / 127, "ema": max(abs(rlo), abs(rhi)) / 127}
    for name, s in scales.items():
        assert abs(s - want[name]) <= 1e-6 * want[name], name
    assert len({round(s, 7) for s in scales.values()}) == 3
    with pytest.raises(ValueError, match="observer"):
        Q.StaticConfig(observer="emaa")
    assert qkern.observers.OBSERVERS["ema"] is O.EMAMinMaxObserver
