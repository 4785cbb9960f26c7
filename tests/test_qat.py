"""Quantization-aware training (QATConfig, quantization/qat/): each method's forward and
gradients against the papers' formulas written here independently (numpy / plain torch), the
converted model equal to the fake-quantized one, learned scales visible to an optimizer, and
the errors for bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import qkern
from qkern.quantization import QATConfig, qat_regularization
from qkern.quantization.qat import LSQPlusQuant, LSQQuant, PACTQuant, QATLinear, STEQuant


def _round_half_even(t: np.ndarray) -> np.ndarray:
    return np.round(t)  # numpy rounds half to even


# ---- the rules, against the papers -------------------------------------------------------


@pytest.mark.parametrize("bits,signed", [(4, True), (3, False), (8, True)])
def test_lsq_forward_and_gradients_follow_the_paper(bits, signed):
    """Esser et al. 2020, eqs. 1-3 and the gradient scale g = 1 / sqrt(N Q_P)."""
    torch.manual_seed(0)
    x = (torch.randn(64, 16) * 2).requires_grad_()
    q = LSQQuant(bits, signed, None)
    q.init_from(x.detach())
    w = torch.randn(64, 16)
    (q(x) * w).sum().backward()
    q_n, q_p = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    xs, s = x.detach().numpy().astype(np.float64), float(q.scale.detach())
    a = np.abs(x.detach().numpy())
    assert s == pytest.approx(2 * a.mean() / math.sqrt(q_p), rel=1e-5)  # the paper's init
    t = xs * np.float32(1 / np.float32(s))
    ref = np.clip(_round_half_even(np.clip(t, -q_n, q_p)), -q_n, q_p) * s
    np.testing.assert_allclose(q(x).detach().numpy(), ref, rtol=0, atol=1e-5 * s)
    g = 1 / math.sqrt(x.numel() * q_p)
    inside = (t >= -q_n) & (t <= q_p)
    ds = np.where(t < -q_n, -q_n, np.where(t > q_p, q_p, _round_half_even(t) - t))
    np.testing.assert_allclose(float(q.scale.grad), g * float((w.numpy() * ds).sum()),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), w.numpy() * inside, rtol=1e-6, atol=1e-7)


def test_lsq_plus_offset_gradient_and_weight_init():
    """LSQ+ (Bhalgat et al. 2020): d v_hat / d beta = 0 inside the range, 1 where clamped
    (times g); weights start from s = max(|mu - 3 sd|, |mu + 3 sd|) / 2^(b-1)."""
    torch.manual_seed(1)
    x = (torch.rand(32, 8) * 6 - 1).requires_grad_()  # asymmetric: a Swish-like range
    q = LSQPlusQuant(4, False, None, offset=True)
    y = q(x)
    beta, s = float(q.offset.detach()), float(q.scale.detach())
    assert beta < 0 < s
    w = torch.randn(32, 8)
    (y * w).sum().backward()
    t = (x.detach().numpy() - beta) * np.float32(1 / np.float32(s))
    clamped = (t < 0) | (t > 15)
    g = 1 / math.sqrt(x.numel() * 15)
    np.testing.assert_allclose(float(q.offset.grad), g * float((w.numpy() * clamped).sum()),
                               rtol=1e-4, atol=1e-6)
    wt = torch.randn(6, 40) * 0.1 + 0.02
    qw = LSQPlusQuant(4, True, 0, init=wt, offset=False)
    mu, sd = wt.double().mean(1), wt.double().std(1)
    want = torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs()) / 8
    torch.testing.assert_close(qw.scale.detach().double(), want, rtol=1e-5, atol=0)


def test_lsq_plus_mse_init_beats_the_min_max_range():
    torch.manual_seed(2)
    x = torch.cat([torch.randn(4000).abs() * 0.3, torch.tensor([8.0])])  # one far outlier
    q = LSQPlusQuant(3, False, None, offset=True)
    q.init_from(x)
    err = float((q(x).detach() - x).square().mean())
    s_mm = float(x.max() - x.min()) / 7
    mm = ((x - x.min()) / s_mm).round().clamp(0, 7) * s_mm + x.min()
    assert err < float((mm - x).square().mean())


def test_pact_forward_and_gradients_follow_the_paper():
    """Choi et al. 2018, eqs. 1-3: y = clip(x, 0, alpha), y_q on alpha / (2^k - 1); dy_q/dx
    = 1 on [0, alpha), d y_q / d alpha = 1 where x >= alpha; the L2 term lambda alpha^2."""
    torch.manual_seed(3)
    x = (torch.randn(50, 20) * 2).requires_grad_()
    q = PACTQuant(3, alpha=1.5, weight_decay=0.01)
    w = torch.randn(50, 20)
    (q(x) * w).sum().backward()
    xs = x.detach().numpy()
    step = np.float32(1.5) / 7
    ref = _round_half_even(np.clip(xs, 0, 1.5) * np.float32(1 / step)) * step
    np.testing.assert_allclose(q(x).detach().numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(float(q.alpha.grad), float((w.numpy() * (xs >= 1.5)).sum()),
                               rtol=1e-5)
    np.testing.assert_allclose(x.grad.numpy(), w.numpy() * ((xs >= 0) & (xs < 1.5)), atol=0)
    assert float(q.regularization()) == pytest.approx(0.01 * 1.5 ** 2)


def test_ste_weights_follow_the_current_max_and_activations_a_moving_average():
    wq = STEQuant(4, True, 0, momentum=None)
    w = torch.randn(5, 12)
    torch.testing.assert_close(wq.running_max if bool(wq.initialized) else w.abs().amax(1),
                               w.abs().amax(1))
    y = wq(w)
    s = w.abs().amax(1, keepdim=True) / 7
    torch.testing.assert_close(y, (w * (1 / s)).round().clamp(-8, 7) * s)
    aq = STEQuant(8, True, None, momentum=0.5)
    aq(torch.full((3,), 2.0))
    aq(torch.full((3,), 4.0))
    assert float(aq.running_max) == pytest.approx(3.0)
    aq.eval()
    aq(torch.full((3,), 100.0))  # eval: frozen
    assert float(aq.running_max) == pytest.approx(3.0)


# ---- prepare -> train -> convert -----------------------------------------------------------


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))


def _train(m: nn.Module, steps: int = 3) -> None:
    # SGD as in the LSQ / PACT papers (Adam's fixed-size steps can push an 8-bit step size of
    # ~1e-4 below zero: the error test below)
    opt = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.rand(16, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        loss = nn.functional.cross_entropy(m(x), y) + qat_regularization(m)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("method", ["ste", "lsq", "lsq+", "pact"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_converted_model_equals_the_fake_quantized_model(method, bits):
    m = qkern.prepare(_net(), QATConfig(weight=bits, activation=bits, method=method))
    _train(m)
    m.eval()
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fake = m(x)
    q = qkern.convert(m)
    assert not any(isinstance(mod, QATLinear) for mod in q.modules())
    assert any(isinstance(mod, qkern.nn.QuantLinear) for mod in q.modules())
    with torch.no_grad():
        real = q(x)
    torch.testing.assert_close(real, fake, rtol=1e-4, atol=1e-4 * float(fake.abs().max()))


def test_learned_scales_are_parameters_an_optimizer_trains():
    net = _net()
    before = copy.deepcopy(net.state_dict())
    m = qkern.prepare(net, QATConfig(weight=4, activation=4, method="lsq"))
    for k, v in net.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k])
    m(torch.rand(2, 1, 8, 8))  # the activation scales are set by the first batch
    scales = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith("scale")}
    assert len(scales) == 6  # 3 weight + 3 input step sizes
    _train(m, 2)
    moved = [n for n, p in m.named_parameters() if n in scales and not torch.equal(p, scales[n])]
    assert len(moved) == 6


def test_weight_only_qat_needs_no_data_and_keeps_float_inputs():
    m = qkern.prepare(_net(), QATConfig(weight=4, activation=None, method="lsq"))
    q = qkern.convert(m)
    assert not any(isinstance(mod, qkern.quantization.ActQuant) for mod in q.modules())


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    ({"method": "lsq", "weight": 1}, "weight"),
    ({"method": "nope"}, "method"),
    ({"method": "pact", "activation": None}, "activation"),
    ({"method": "pact", "act_signed": True}, "act_signed"),
    ({"activation": 9}, "activation"),
    ({"pact_alpha": -1.0}, "pact_alpha"),
])
def test_bad_configs_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        QATConfig(**kw)


def test_convert_before_any_batch_is_refused():
    m = qkern.prepare(_net(), QATConfig(weight=4, activation=4, method="lsq"))
    with pytest.raises(ValueError, match="seen no data"):
        qkern.convert(m)


def test_a_non_positive_learned_scale_is_named():
    m = qkern.prepare(_net(), QATConfig(weight=4, activation=4, method="lsq"))
    m(torch.rand(2, 1, 8, 8))
    with torch.no_grad():
        m[3].weight_fake.scale[0] = -1.0
    with pytest.raises(ValueError, match=r"3\.weight.*non-positive"):
        m(torch.rand(2, 1, 8, 8))
