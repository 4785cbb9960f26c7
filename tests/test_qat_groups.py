"""Group-wise QAT weights (``QATConfig(group_size=g)``), per-token dynamic int8 activations
(``act_granularity="token"``) and LSQ's ``lsq_init="mse"``: the fake quantizers against
numpy references written here, the converted QuantLinear equal to the fake-quantized model,
and the errors for configs that cannot work."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import qkern
from qkern.nn import QuantLinear
from qkern.quantization import QATConfig
from qkern.quantization.qat import LSQQuant, STEQuant, TokenQuant


def _grouped_ref(w: np.ndarray, g: int, s: np.ndarray, q_n: int, q_p: int) -> np.ndarray:
    """round(clamp(w / s, -Q_N, Q_P)) s with one step per group of g inputs (s: (out, in/g))."""
    out, k = w.shape
    wg = w.reshape(out, k // g, g)
    t = wg * (np.float32(1) / s.astype(np.float32))[..., None]
    return (np.round(np.clip(t, -q_n, q_p)) * s[..., None]).reshape(out, k)


def test_lsq_group_forward_and_step_gradient():
    """LSQ per group: init max|w_group| / Q_P, forward per group, and d/ds with the gradient
    scale g = 1 / sqrt(N Q_P), N = the group's size (Esser et al. 2020)."""
    torch.manual_seed(0)
    w = torch.randn(6, 64).requires_grad_()
    q = LSQQuant(4, True, 0, init=w.detach(), init_mode="max", group_size=16)
    assert q.scale.shape == (24,)
    wn = w.detach().numpy().astype(np.float64)
    s_ref = np.abs(wn.reshape(6, 4, 16)).max(-1) / 7
    np.testing.assert_allclose(q.scale.detach().numpy().reshape(6, 4), s_ref, rtol=1e-6)
    with torch.no_grad():  # move the steps off max so some values clip
        q.scale.mul_(0.8)
    s = q.scale.detach().numpy().reshape(6, 4)
    y = q(w)
    np.testing.assert_allclose(y.detach().numpy(), _grouped_ref(wn, 16, s, 8, 7), rtol=0,
                               atol=1e-6)
    up = torch.randn(6, 64)
    (y * up).sum().backward()
    t = (wn.reshape(6, 4, 16) * (np.float32(1) / s.astype(np.float32))[..., None])
    ds = np.where(t < -8, -8.0, np.where(t > 7, 7.0, np.round(t) - t))
    g = 1 / math.sqrt(16 * 7)
    want = g * (up.numpy().reshape(6, 4, 16) * ds).sum(-1)
    np.testing.assert_allclose(q.scale.grad.numpy().reshape(6, 4), want, rtol=1e-4, atol=1e-6)
    inside = (t >= -8) & (t <= 7)
    np.testing.assert_allclose(w.grad.numpy(), (up.numpy().reshape(6, 4, 16) * inside)
                               .reshape(6, 64), rtol=1e-6)


def test_ste_group_scale_is_the_group_max():
    torch.manual_seed(1)
    w = torch.randn(5, 96)
    q = STEQuant(3, True, 0, momentum=None, group_size=32)
    y = q(w).numpy()
    s = np.abs(w.numpy().astype(np.float64).reshape(5, 3, 32)).max(-1) / 3
    np.testing.assert_allclose(y, _grouped_ref(w.numpy(), 32, s, 4, 3), rtol=0, atol=1e-6)


def test_lsq_mse_init_is_the_least_squares_clip_per_group():
    torch.manual_seed(2)
    w = torch.randn(4, 128)
    w[0, 3] = 9.0  # an outlier
    q = LSQQuant(4, True, 0, init=w, init_mode="mse", group_size=64)
    scale = q.scale.detach()
    wg = w.numpy().astype(np.float64).reshape(8, 64)
    for i, row in enumerate(wg):  # brute force over r = 0.30, 0.31 .. 1.00
        errs = [(r, ((np.round(np.clip(row / (r * np.abs(row).max() / 7), -8, 7))
                      * r * np.abs(row).max() / 7 - row) ** 2).sum())
                for r in np.round(np.arange(30, 101) / 100, 2)]
        best = min(e for _, e in errs)
        got = float(scale[i]) * 7 / np.abs(row).max()
        err_got = dict(errs)[min(dict(errs), key=lambda r: abs(r - got))]
        assert err_got <= best * (1 + 1e-4), (i, got, best)
    ratios = scale.numpy() * 7 / np.abs(wg).max(1)
    assert ratios.min() < 0.95 and ratios.max() <= 1.0 + 1e-6  # Gaussian groups clip


def test_token_quant_matches_a_per_row_reference_and_passes_the_gradient():
    torch.manual_seed(3)
    x = (torch.randn(2, 5, 24) * torch.linspace(0.1, 4, 5)[:, None]).requires_grad_()
    x.data[0, 1] = 0.0  # an all-zero token: scale 1, codes 0
    y = TokenQuant()(x)
    xn = x.detach().numpy().reshape(10, 24).astype(np.float32)
    amax = np.abs(xn).max(1, keepdims=True)
    s = np.where(amax > 0, amax / np.float32(127), 1).astype(np.float32)
    ref = np.clip(np.round(xn * (np.float32(1) / s)), -127, 127) * s
    np.testing.assert_array_equal(y.detach().numpy().reshape(10, 24), ref)
    up = torch.randn_like(x)
    (y * up).sum().backward()
    torch.testing.assert_close(x.grad, up)  # nothing clips: the identity
    with pytest.raises(ValueError, match="NaN or Inf"):
        TokenQuant()(torch.full((2, 4), float("nan")))


def _model() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32), nn.ReLU(),
                         nn.Linear(32, 8))


@pytest.mark.parametrize("method,g,token", [("lsq", 32, False), ("lsq", 32, True),
                                            ("ste", 32, True), ("lsq+", 32, False),
                                            ("lsq", None, True), ("pact", 32, False)])
def test_convert_equals_the_fake_quantized_model(method, g, token):
    cfg = QATConfig(weight=4, activation=8, method=method, group_size=g, lsq_init="max"
                    if method == "lsq" else "paper",
                    overrides={"2": {"act_granularity": "token"}} if token else {})
    q = qkern.prepare(_model(), cfg)
    x = torch.randn(3, 7, 64)
    opt = torch.optim.SGD(q.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        q(x).square().mean().backward()
        opt.step()
    q.eval()
    wq, w0 = q[0].weight_fake, q[0].weight.detach().numpy().copy()
    with torch.no_grad():
        want = q(x)
        c = qkern.convert(q)
        got = c(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    lins = [m for m in c.modules() if isinstance(m, QuantLinear)]
    assert len(lins) == 3
    for lin in lins:
        if g is not None:
            assert lin.weight_q.group_size == g and lin.kernel in ("w4_exact", "a8_token")
    assert (lins[1].act == "int8_token") == token
    assert isinstance(c[2], QuantLinear) == token  # no ActQuant in front of a per-token layer
    if g is not None and method in ("lsq", "ste"):  # the deployed grid: the learned steps
        s = (wq.scale.detach() if method == "lsq" else wq.running_max / 7).numpy()
        np.testing.assert_allclose(lins[0].dequantize_weight().numpy(),
                                   _grouped_ref(w0, 32, s.reshape(96, 2), 8, 7), rtol=0,
                                   atol=1e-6)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="group_size"):
        QATConfig(method="dorefa", group_size=32)
    for m, w in (("ttq", 2), ("inq", 4)):
        with pytest.raises(ValueError, match="group_size"):
            QATConfig(method=m, weight=w, group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        QATConfig(group_size=0)
    with pytest.raises(ValueError, match=r"layer's input size 96"):
        qkern.prepare(_model(), QATConfig(group_size=64))  # 64 divides 64 and 32? no: 96
    with pytest.raises(ValueError, match="act_granularity"):
        QATConfig(activation=4, act_granularity="token")
    with pytest.raises(ValueError, match="act_granularity"):
        QATConfig(method="pact", act_granularity="token")
    with pytest.raises(ValueError, match="act_granularity"):
        QATConfig(act_granularity="channel")
    with pytest.raises(ValueError, match="lsq_init"):
        QATConfig(lsq_init="minmax")
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3))
    with pytest.raises(ValueError, match=r"0: act_granularity='token' takes nn.Linear"):
        qkern.prepare(conv, QATConfig(act_granularity="token"))
