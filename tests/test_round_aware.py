"""Round-aware loss shaping: the penalties against numpy written from their definitions, the
fixed grid scales against numpy's max|w| / qmax, the rounding on that grid against numpy RTN,
and the effect (penalty falls, lam = 0 is plain RTN)."""

import numpy as np
import pytest
import torch

from qkern import quantization as Q
from qkern.quantization.algorithms.round_aware import grid_penalty, layer_grids


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(64, 32, generator=g) for _ in range(4)]


@pytest.mark.parametrize("kind", ["cos", "l2"])
def test_penalty_matches_numpy(kind):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    s = torch.rand(5, 1, generator=g, dtype=torch.float64) + 0.1
    u = w.numpy() / s.numpy()
    ref = (1 - np.cos(2 * np.pi * u)) / 2 if kind == "cos" else 4 * (u - np.rint(u)) ** 2
    assert abs(float(grid_penalty(w, s, kind)) - ref.mean()) < 1e-12
    on_grid = torch.tensor([-3.0, 0.0, 2.0]) * 0.25
    assert float(grid_penalty(on_grid, torch.tensor(0.25), kind)) < 1e-12
    with pytest.raises(ValueError, match="kind must be one of"):
        grid_penalty(w, s, "l1")


def test_grids_are_max_over_qmax():
    m = net()
    grids = layer_grids(m, {"0": ("int3", None), "2": ("int4", 16)})
    w0 = m[0].weight.detach().numpy()
    np.testing.assert_allclose(grids["0"].scale.numpy(), np.abs(w0).max(1) / 3, rtol=1e-6)
    w2 = m[2].weight.detach().numpy().reshape(8, 4, 16)
    np.testing.assert_allclose(grids["2"].scale.reshape(8, 4).numpy(),
                               np.abs(w2).max(2) / 7, rtol=1e-6)
    e = grids["2"].expanded(m[2].weight.shape)
    assert e.shape == (8, 64) and float(e[3, 17]) == float(grids["2"].scale.reshape(8, 4)[3, 1])
    with pytest.raises(ValueError, match="signed integer format"):
        layer_grids(m, {"0": ("uint4", None)})


def rtn_numpy(w, s, qmin, qmax):
    return np.clip(np.rint(w / s), qmin, qmax) * s


def test_lam_zero_is_rtn_and_shaping_rounds_on_the_fixed_grid():
    m, b = net(), batches()
    w0 = m[0].weight.detach().numpy().copy()
    s0 = np.abs(w0).max(1, keepdims=True) / 3
    q0 = Q.quantize_model(m, Q.RoundAwareConfig(fmt="int3", lam=0.0, steps=5), b)
    np.testing.assert_allclose(q0[0].dequantize_weight().numpy(), rtn_numpy(w0, s0, -4, 3),
                               rtol=1e-6, atol=1e-7)
    quant = Q.prepare(m, Q.RoundAwareConfig(fmt="int3", lam=5.0, steps=150, lr=2e-3))
    for x in b:
        quant(x)
    qz = Q.convert(quant)
    wq = qz[0].dequantize_weight().numpy()
    codes = wq / s0  # on the grid fixed from the float weights
    np.testing.assert_allclose(codes, np.rint(codes), atol=1e-4)
    assert np.abs(codes).max() <= 3 + 1e-4


def test_shaping_pulls_weights_to_the_grid():
    m, b = net(), batches()
    grids = layer_grids(m, {"0": ("int3", None), "2": ("int3", None)})
    ref = torch.cat([m(x) for x in b]).detach()

    def loss(model, x):
        i = next(j for j, y in enumerate(b) if y is x)
        return (model(x) - ref[64 * i:64 * (i + 1)]).square().mean()

    hist = Q.round_aware_finetune(m, grids, b, loss, steps=200, lr=2e-3, lam=5.0, penalty="l2")
    assert hist[-1] < 0.2 * hist[0]
    def grid_err(model):
        err = 0.0
        for n in ("0", "2"):
            w = model.get_submodule(n).weight.detach()
            s = grids[n].expanded(w.shape)
            err += float((w - torch.round(w / s) * s).square().sum())
        return err

    shaped_err, rtn_err = grid_err(m), grid_err(net())
    assert shaped_err < 0.3 * rtn_err
    Q.round_on_grid(m, grids)
    assert type(m[0]).__name__ == "QuantLinear"


def test_config_errors():
    with pytest.raises(ValueError, match="signed integer format"):
        Q.RoundAwareConfig(fmt="uint4")
    with pytest.raises(ValueError, match="penalty"):
        Q.RoundAwareConfig(penalty="l1")
    with pytest.raises(ValueError, match="lam"):
        Q.RoundAwareConfig(lam=-1)
    with pytest.raises(ValueError, match="at least one batch"):
        Q.round_aware_finetune(net(), {}, [], lambda m, b: 0)
