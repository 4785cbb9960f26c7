"""Relaxed quantization (Louizos et al. 2019): the cell probabilities against a numpy
reference of the logistic CDF differences written from the paper's definition, gradients to
the step and the noise scale, the sigma -> 0 limit equal to round-to-nearest (numpy), and the
QATConfig method "relaxed" converting to the RTN of the latent weights at the learned step."""

import warnings

import numpy as np
import pytest
import torch

from qkern import quantization as Q
from qkern.quantization.qat import RelaxedQuant


def np_probs(x, s, sigma, q_n, q_p):
    """p_i = F((g_i + s/2 - x)/sigma) - F((g_i - s/2 - x)/sigma), F logistic, outer cells
    open (F(-inf) = 0, F(inf) = 1)."""
    x = np.asarray(x, np.float64)[..., None]
    g = np.arange(-q_n, q_p + 1) * s
    up = 1 / (1 + np.exp(-(g + s / 2 - x) / sigma))
    lo = 1 / (1 + np.exp(-(g - s / 2 - x) / sigma))
    up[..., -1] = 1.0
    lo[..., 0] = 0.0
    return up - lo


@pytest.mark.parametrize("bits,signed", [(2, True), (3, True), (4, False)])
def test_probs_match_numpy_and_sum_to_one(bits, signed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g) * 2
    q = RelaxedQuant(bits, signed, None, init=x.abs() if not signed else x)
    with torch.no_grad():
        q.log_sigma.fill_(float(np.log(0.4)))
    p = q.cell_probs(x).detach().double().numpy()
    s = float(q.scale.detach())
    ref = np_probs(x.numpy(), s, 0.4, q.q_n, q.q_p)
    assert p.shape == (7, 5, 2 ** bits)
    np.testing.assert_allclose(p, ref, atol=2e-6)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)


def test_per_channel_probs():
    w = torch.randn(3, 4, 2)
    q = RelaxedQuant(3, True, 0, init=w)
    s = w.abs().amax((1, 2)).numpy() / 3
    np.testing.assert_allclose(q.scale.detach().numpy(), s, rtol=1e-6)
    np.testing.assert_allclose(q.sigma.detach().numpy(), s / 3, rtol=1e-5)
    p = q.cell_probs(w).detach().double().numpy()
    for c in range(3):
        np.testing.assert_allclose(p[c], np_probs(w[c].numpy(), s[c], s[c] / 3, 4, 3),
                                   atol=2e-6)


@pytest.mark.parametrize("hard", [False, True])
def test_gradients_reach_step_and_sigma(hard):
    torch.manual_seed(1)
    x = torch.randn(64, requires_grad=True)
    q = RelaxedQuant(3, True, None, init=x.detach(), hard=hard).train()
    (q(x) * torch.linspace(-1, 1, 64)).sum().backward()
    for t in (q.log_scale.grad, q.log_sigma.grad, x.grad):
        assert t is not None and torch.isfinite(t).all() and float(t.abs().sum()) > 0


@pytest.mark.parametrize("hard", [False, True])
def test_sigma_to_zero_is_round_to_nearest(hard):
    torch.manual_seed(2)
    x = torch.randn(1000) * 1.3
    q = RelaxedQuant(3, True, None, init=x, hard=hard).train()
    with torch.no_grad():
        q.log_sigma.fill_(float(np.log(1e-7)))
    s = float(q.scale.detach())
    ref = np.clip(np.rint(x.numpy().astype(np.float64) / s), -4, 3) * s
    np.testing.assert_allclose(q(x).detach().numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(q.eval()(x).detach().numpy(), ref, atol=1e-6)  # eval: RTN


def test_wide_sigma_is_not_rtn():
    x = torch.tensor([0.3, -0.45, 0.9])
    q = RelaxedQuant(2, True, None, init=torch.tensor([1.0])).train()
    torch.manual_seed(0)
    assert not torch.equal(q(x), q.eval()(x))


def test_qat_method_relaxed_converts_to_rtn_at_learned_step():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    m = Q.prepare(net, Q.QATConfig(method="relaxed", weight=3, activation=4, relaxed_tau=0.5))
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    wq = m[0].weight_fake
    s = wq.scale.detach().numpy()
    w = m[0].weight.detach().numpy().astype(np.float64)
    ref = np.clip(np.rint(w / s[:, None]), -4, 3) * s[:, None]
    m.eval()
    want = m(x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = Q.convert(m)
    np.testing.assert_allclose(q[0].module.dequantize_weight().numpy(), ref, rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(q(x), want, rtol=1e-4, atol=1e-4)


def test_bad_input():
    with pytest.raises(ValueError, match="tau"):
        RelaxedQuant(2, tau=0)
    with pytest.raises(ValueError, match="relaxed_tau"):
        Q.QATConfig(method="relaxed", relaxed_tau=-1.0)
    with pytest.raises(ValueError, match="relaxed_hard"):
        Q.QATConfig(method="relaxed", relaxed_hard="yes")
    with pytest.raises(ValueError, match="weight"):
        Q.QATConfig(method="relaxed", weight=1)
