"""Issue 9, silent wrong results: asymmetric ranges whose max - min overflows float32 on finite
data (quantize and every range observer), checked against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qkern
from qkern import observers as O

HUGE = [3e38, -3e38, 1.0, 0.0]


def _ref_scale(lo: float, hi: float, steps: int) -> float:
    """(max(hi, 0) - min(lo, 0)) / steps in float64 (exact enough: within an ulp of float32)."""
    return (max(hi, 0.0) - min(lo, 0.0)) / steps


def _check_roundtrip(q, x: torch.Tensor) -> None:
    d = qkern.dequantize(q).double()
    assert torch.isfinite(d).all(), d
    step = q.scale.double().max()  # half a step, plus the float32 rounding of x * (1/scale)
    assert ((d - x.double()).abs() <= 0.5 * step + 2.0**-20 * x.double().abs()).all()


@pytest.mark.parametrize("fmt", ["int8", "uint8", "int4", "uint2"])
@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_asymmetric_range_overflow_quantize(fmt, isa):
    x = torch.tensor(HUGE * 16)  # 64 elements: the AVX2 loop's full vectors
    qkern.set_isa(isa)
    q = qkern.quantize(x, fmt, symmetric=False)
    f = qkern.formats.get(fmt)
    ref = _ref_scale(-3e38, 3e38, f.qmax - f.qmin)
    assert np.isfinite(float(q.scale))
    assert abs(float(q.scale) - ref) <= ref * 2.0**-23
    _check_roundtrip(q, x)


def test_asymmetric_range_overflow_per_group_and_channel():
    x = torch.tensor([HUGE, [1.0, -2.0, 0.5, 0.0]] * 3)
    for kw in ({"granularity": "channel"}, {"granularity": "group", "group_size": 2}):
        q = qkern.quantize(x, "int8", symmetric=False, **kw)
        _check_roundtrip(q, x)
    # a row with an ordinary range is unaffected by its huge neighbour
    qc = qkern.quantize(x, "int8", symmetric=False, granularity="channel")
    q1 = qkern.quantize(x[1], "int8", symmetric=False)
    assert torch.equal(qc.scale[1].reshape(()), q1.scale)


def test_asymmetric_range_overflow_one_bit_is_an_error():
    with pytest.raises(ValueError, match="beyond float32"):
        qkern.quantize(torch.tensor(HUGE), "uint1", symmetric=False)
    with pytest.raises(ValueError, match="beyond float32"):
        O.qparams_from_range(torch.tensor(-3e38), torch.tensor(3e38), "uint1", False)


@pytest.mark.parametrize("name", ["minmax", "moving_average", "percentile", "mse", "histogram"])
def test_observers_asymmetric_range_overflow(name):
    x = torch.tensor(HUGE)
    obs = O.make_observer(name, fmt="int8", symmetric=False)
    obs(x)
    if name == "moving_average":  # the average of two batches whose difference overflows
        obs(torch.tensor([3e38, 3e38, 3e38, 3e38]))
        obs(torch.tensor([-3e38, -3e38, -3e38, -3e38]))
    scale, zp = obs.calculate_qparams()
    lo, hi = (float(v) for v in obs.min_max_range())
    assert np.isfinite(lo) and np.isfinite(hi)
    ref = _ref_scale(lo, hi, 255)
    assert np.isfinite(float(scale)) and abs(float(scale) - ref) <= ref * 2.0**-23
    d = qkern.dequantize(obs.quantize(x))
    assert torch.isfinite(d).all()


def test_moving_average_overflow_matches_float64():
    obs = O.MovingAverageMinMaxObserver("int8", symmetric=False, averaging_constant=0.5)
    obs(torch.tensor([3e38, 2e38]))
    obs(torch.tensor([-3e38, -3e38]))
    lo, hi = obs.min_max_range()
    assert float(lo) == pytest.approx(2e38 + 0.5 * (-3e38 - 2e38), rel=1e-6)
    assert float(hi) == 0.0  # 3e38 + 0.5 * (-3e38 - 3e38)


def test_lsq_initial_step_overflow():
    obs = O.LSQObserver("int8")
    x = torch.tensor([3e38, -3e38, 3e38, -3e38])
    obs(x)
    scale, _ = obs.calculate_qparams()
    ref = 2 * 3e38 / np.sqrt(127)  # 2 mean|x| / sqrt(Q_P), float64
    assert float(scale) == pytest.approx(ref, rel=1e-6)
    assert torch.isfinite(obs.fake_quantize(x)).all()
