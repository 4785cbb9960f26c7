"""1-bit QAT (quantization/qat/binary.py): BinaryConnect, XNOR-Net and ABC-Net against the
papers' formulas written here independently (numpy loops), the converted models on qkern's
binary kernels equal to the fake-quantized ones, and the errors for bad input."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qkern
from qkern.quantization import QATConfig
from qkern.quantization.qat import (
    ABCInputQuant,
    ABCWeightQuant,
    BinaryConnectQuant,
    QATLinear,
    XNORConv2d,
    XNORWeightQuant,
    clip_latent_weights,
)


def _sgn(a: np.ndarray) -> np.ndarray:
    return np.where(a >= 0, 1.0, -1.0)


def _conv_ref(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Plain loops: y[b, o, i, j] = sum_{c, u, v} xp[b, c, i*s+u, j*s+v] w[o, c, u, v]."""
    b, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.zeros((b, c, h + 2 * pad, wd + 2 * pad))
    xp[:, :, pad:pad + h, pad:pad + wd] = x
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    y = np.zeros((b, o, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            y[:, :, i, j] = np.einsum("bcuv,ocuv->bo", patch, w)
    return y


# ---- BinaryConnect -------------------------------------------------------------------------


def test_binaryconnect_sign_ste_and_clip():
    torch.manual_seed(0)
    w = (torch.randn(6, 10) * 1.5).requires_grad_()
    q = BinaryConnectQuant()
    g = torch.randn(6, 10)
    (q(w) * g).sum().backward()
    wn = w.detach().numpy()
    np.testing.assert_array_equal(q(w).detach().numpy(), _sgn(wn))
    np.testing.assert_allclose(w.grad.numpy(), g.numpy() * (np.abs(wn) <= 1))
    model = qkern.prepare(nn.Sequential(nn.Linear(10, 6)),
                          QATConfig(weight=1, activation=None, method="binaryconnect"))
    with torch.no_grad():
        model[0].weight.mul_(5)
    clip_latent_weights(model)
    assert float(model[0].weight.abs().max()) <= 1.0
    assert float(model[0].weight.abs().max()) == 1.0  # some were outside


def test_binaryconnect_stochastic_follows_hard_sigmoid():
    torch.manual_seed(0)
    w = torch.tensor([-1.5, -0.6, 0.0, 0.3, 0.9, 2.0])
    q = BinaryConnectQuant(stochastic=True)
    draws = torch.stack([q(w) for _ in range(4000)])
    p = np.clip((w.numpy() + 1) / 2, 0, 1)  # hard_sigmoid
    np.testing.assert_allclose((draws == 1).float().mean(0).numpy(), p, atol=0.03)
    assert set(torch.unique(draws).tolist()) <= {-1.0, 1.0}
    q.eval()
    np.testing.assert_array_equal(q(w).numpy(), _sgn(w.numpy()))  # deterministic at deploy


# ---- XNOR-Net ------------------------------------------------------------------------------


def test_xnor_weight_alpha_per_filter_and_gradient():
    torch.manual_seed(1)
    w = (torch.randn(4, 3, 3, 3) * 0.8).requires_grad_()
    g = torch.randn(4, 3, 3, 3)
    q = XNORWeightQuant()
    out = q(w)
    (out * g).sum().backward()
    wn, gn = w.detach().numpy().reshape(4, -1), g.numpy().reshape(4, -1)
    alpha = np.abs(wn).mean(1, keepdims=True)
    np.testing.assert_allclose(out.detach().numpy().reshape(4, -1), alpha * _sgn(wn), rtol=1e-6)
    # d/dW_i of alpha * sign(W_i): alpha 1{|W_i| <= 1} g_i + sign(W_i)/n sum_j g_j sign(W_j)
    n = wn.shape[1]
    ref = alpha * (np.abs(wn) <= 1) * gn + _sgn(wn) / n * (gn * _sgn(wn)).sum(1, keepdims=True)
    np.testing.assert_allclose(w.grad.numpy().reshape(4, -1), ref, rtol=1e-5, atol=1e-6)


def test_xnor_linear_forward_and_input_gradient():
    torch.manual_seed(2)
    lin = nn.Linear(12, 5)
    m = qkern.prepare(nn.Sequential(lin), QATConfig(weight=1, activation=1, method="xnor"))
    x = (torch.randn(7, 12) * 1.2).requires_grad_()
    y = m(x)
    g = torch.randn(7, 5)
    (y * g).sum().backward()
    xn, wn = x.detach().numpy(), lin.weight.detach().numpy()
    beta = np.abs(xn).mean(1, keepdims=True)
    alpha = np.abs(wn).mean(1)
    ref = beta * (_sgn(xn) @ _sgn(wn).T) * alpha + lin.bias.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    # the scaling K is a constant of the backward pass; sign passes 1{|x| <= 1}
    gx = (g.numpy() @ (alpha[:, None] * _sgn(wn))) * beta * (np.abs(xn) <= 1)
    np.testing.assert_allclose(x.grad.numpy(), gx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride,pad", [(1, 1), (2, 0), (2, 1)])
def test_xnor_conv_k_map(stride, pad):
    """(sign(I) * sign(W)) . K alpha, K = A * k: A the channel mean of |I| (zero padded), k
    a box filter of the kernel size."""
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=pad)
    m = qkern.prepare(nn.Sequential(conv), QATConfig(weight=1, activation=1, method="xnor"))
    assert isinstance(m[0], XNORConv2d)
    x = torch.randn(2, 3, 7, 6)
    y = m(x).detach().numpy()
    xn, wn = x.numpy(), conv.weight.detach().numpy()
    alpha = np.abs(wn).reshape(4, -1).mean(1)
    a = np.abs(xn).mean(1, keepdims=True)
    k = _conv_ref(a, np.full((1, 1, 3, 3), 1 / 9), stride, pad)
    ref = _conv_ref(_sgn(xn), _sgn(wn), stride, pad) * k * alpha[None, :, None, None]
    ref += conv.bias.detach().numpy()[None, :, None, None]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


# ---- ABC-Net -------------------------------------------------------------------------------


def test_abc_weight_bases_least_squares_and_training():
    torch.manual_seed(4)
    w = torch.randn(8, 20)
    q = ABCWeightQuant(3, w)
    wn = w.numpy().astype(np.float64)
    mu, sd = wn.mean(), wn.std(ddof=1)
    u = [-1.0, 0.0, 1.0]  # u_i = -1 + (i - 1) 2 / (M - 1)
    b = np.stack([_sgn(wn - mu + ui * sd) for ui in u])
    alpha = np.linalg.lstsq(b.reshape(3, -1).T, wn.reshape(-1), rcond=None)[0]
    np.testing.assert_allclose(q.alpha.detach().numpy(), alpha, rtol=1e-5, atol=1e-6)
    wp = w.clone().requires_grad_()
    out = q(wp)
    np.testing.assert_allclose(out.detach().numpy(), np.tensordot(alpha, b, 1), rtol=1e-5,
                               atol=1e-6)
    g = torch.randn(8, 20)
    (out * g).sum().backward()
    # identity STE for each base: dc/dW = sum_m alpha_m dc/dB_m
    np.testing.assert_allclose(wp.grad.numpy(), alpha.sum() * g.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.alpha.grad.numpy(), (b * g.numpy()).sum((1, 2)) / 160 ** 0.5,
                               rtol=1e-5)  # gradient scaled by 1 / sqrt(numel), as LSQ
    # closer to W than one base alone
    err3 = np.linalg.norm(wn - np.tensordot(alpha, b, 1))
    err1 = np.linalg.norm(wn - np.abs(wn).mean() * _sgn(wn - mu))
    assert err3 < 0.7 * err1


def test_abc_activation_bases():
    torch.manual_seed(5)
    x = torch.rand(16, 10) * 2
    q = ABCInputQuant(3)
    y = q(x)
    xn = x.numpy().astype(np.float64)
    v = 0.5 - (xn.mean() + np.array([-1.0, 0.0, 1.0]) * xn.std(ddof=1))
    np.testing.assert_allclose(q.shift.detach().numpy(), v, rtol=1e-5, atol=1e-6)
    h = np.stack([np.where(np.clip(xn + vi, 0, 1) >= 0.5, 1.0, -1.0) for vi in v])
    beta = np.linalg.lstsq(h.reshape(3, -1).T, xn.reshape(-1), rcond=None)[0]
    np.testing.assert_allclose(q.beta.detach().numpy(), beta, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y.detach().numpy(), np.tensordot(beta, h, 1), rtol=1e-4,
                               atol=1e-5)
    # learned shifts and scales get gradients: d/dv_n = beta_n 1{0 <= x + v_n <= 1} g
    xr = x.clone().requires_grad_()
    g = torch.randn(16, 10)
    (q(xr) * g).sum().backward()
    inside = np.stack([(xn + vi >= 0) & (xn + vi <= 1) for vi in q.shift.detach().numpy()])
    np.testing.assert_allclose(q.shift.grad.numpy(),
                               q.beta.detach().numpy() * (inside * g.numpy()).sum((1, 2))
                               / 160 ** 0.5,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(q.beta.grad.numpy(), (h * g.numpy()).sum((1, 2)) / 160 ** 0.5,
                               rtol=1e-4, atol=1e-4)


# ---- convert == fake, on the binary kernels ------------------------------------------------


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def _kernels(model: nn.Module) -> set[str]:
    return {m.kernel for m in model.modules() if hasattr(m, "kernel_reason")}


@pytest.mark.parametrize("method,act,kernels", [
    ("binaryconnect", None, {"binary"}), ("binaryconnect", 4, {"binary"}),
    ("xnor", 1, {"binary_xnor"}), ("abc", 1, {"binary"}), ("abc", None, {"binary"})])
def test_converted_equals_fake_quantized(method, act, kernels):
    torch.manual_seed(6)
    q = qkern.prepare(_cnn(), QATConfig(weight=1, activation=act, method=method))
    opt = torch.optim.SGD(q.parameters(), lr=1e-2, momentum=0.9)
    for _ in range(3):
        x = torch.rand(8, 3, 8, 8)
        loss = nn.functional.cross_entropy(q(x), torch.randint(0, 10, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        clip_latent_weights(q)
    q.eval()
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fake = q(x)
        d = qkern.convert(copy.deepcopy(q))
        out = d(x)
    assert _kernels(d) == kernels
    tol = 1e-4 * float(fake.abs().max()) + 1e-5
    assert float((out - fake).abs().max()) <= tol


def test_abc_deploys_m_times_n_kernels():
    torch.manual_seed(7)
    q = qkern.prepare(nn.Sequential(nn.Linear(32, 6)),
                      QATConfig(weight=1, activation=1, method="abc", abc_weight_bases=2,
                                abc_act_bases=3))
    x = torch.randn(4, 32)
    q(x)
    assert isinstance(q[0], QATLinear)
    d = qkern.convert(copy.deepcopy(q))
    assert len(d[0].layers) == 2 and len(d[0].beta) == 3
    with torch.no_grad():
        np.testing.assert_allclose(d(x).numpy(), q(x).numpy(), rtol=1e-4, atol=1e-5)


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,field", [
    ({"method": "xnor", "weight": 2, "activation": 1}, "weight"),
    ({"method": "binaryconnect", "weight": 4, "activation": None}, "weight"),
    ({"method": "abc", "weight": 8, "activation": None}, "weight"),
    ({"method": "xnor", "weight": 1, "activation": 4}, "activation"),
    ({"method": "xnor", "weight": 1, "activation": None}, "activation"),
    ({"method": "abc", "weight": 1, "activation": 2}, "activation"),
    ({"method": "lsq", "weight": 1, "activation": 4}, "weight"),
    ({"method": "lsq", "weight": 4, "activation": 1}, "activation"),
    ({"method": "lsq", "weight": 4, "stochastic": True}, "stochastic"),
    ({"method": "abc", "weight": 1, "activation": 1, "abc_weight_bases": 0},
     "abc_weight_bases"),
    ({"method": "abc", "weight": 1, "activation": 1, "abc_act_bases": 9}, "abc_act_bases"),
])
def test_bad_bits_raise_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        QATConfig(**kw)
