"""Every custom backward in qkern against finite differences (issue 13, "gradcheck in
float64"). Two kinds of check, named in each test:

- GRADCHECK: the function is smooth in the checked inputs, so its backward is its derivative:
  ``torch.autograd.gradcheck`` in float64 (float32 ops: a float64 wrapper, float32 tolerance).
- SURROGATE: the forward is piecewise constant (round, sign) and the backward is a *defined*
  surrogate (a straight-through estimator). The test writes the surrogate function from the
  paper (a clip for the clipped STE, ``t + (round(t0) - t0)`` for STE round, ``p0 + g (p - p0)``
  for a gradient scale g, ...) and compares the backward with float64 central differences of
  that function at the same point (points kept away from the surrogate's kinks).
docs/qat.md, "Gradients", lists them."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import qkern
from qkern.interop import qdq
from qkern.nn import QuantLinear
from qkern.observers.lsq import grad_scaled, lsq_fake_quantize, ste_round
from qkern.quantization.qat import binary, dorefa, inq, pact, ttq

D = torch.float64


def fd_grads(f, inputs, v, eps=1e-6):
    """float64 central differences of ``sum(f(*inputs) * v)`` with respect to every input."""
    base = [t.detach().to(D).clone() for t in inputs]
    out = []
    for i, x in enumerate(base):
        g = torch.zeros_like(x)
        for k in range(x.numel()):
            vals = []
            for d in (eps, -eps):
                xs = [t.clone() for t in base]
                xs[i].view(-1)[k] += d
                vals.append(float((f(*xs).to(D) * v).sum()))
            g.view(-1)[k] = (vals[0] - vals[1]) / (2 * eps)
        out.append(g)
    return out


def backward_of(y, inputs, v):
    return [g.to(D) for g in torch.autograd.grad(y, inputs, v.to(y.dtype))]


def away(x, kinks, gap=1e-3):
    """``x`` with every element closer than ``gap`` to one of ``kinks`` moved off by 2 gap."""
    x = x.clone()
    for k in kinks:
        near = (x - k).abs() < gap
        x[near] = k + 2 * gap
    return x


def close(got, want, rtol=1e-6, atol=1e-7):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def htanh(x):
    return x.clamp(-1, 1)


# ------------------------------------------------------------------ ops: fwht, matmuls, QDQ
def _hadamard(n):
    h = torch.ones(1, 1, dtype=D)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(n)


def test_fwht_backward_vs_float64_fd():
    """GRADCHECK (float32 op): qkern::fwht is linear; its backward (fwht of the gradient)
    against float64 differences of x H / sqrt(n) built here, and gradcheck of the op itself
    (eps 0.5 is exact for a linear map; float32 tolerance)."""
    torch.manual_seed(0)
    x = torch.randn(3, 16, requires_grad=True)
    v = torch.randn(3, 16, dtype=D)
    got = backward_of(torch.ops.qkern.fwht(x), [x], v)
    want = fd_grads(lambda t: t @ _hadamard(16), [x], v)
    close(got, want, rtol=1e-5, atol=1e-5)
    xd = torch.randn(2, 8, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.qkern.fwht(t.float()).to(D), (xd,),
                                    eps=0.5, atol=1e-5, rtol=1e-4)


STE_MATMULS = [("int8", dict(group_size=None, act="int8_dynamic"), "w8a8"),
               ("int8", dict(group_size=None, act="int8_dynamic_tensor"), "w8a8_tensor"),
               ("int8", dict(group_size=None, act="int8_static", act_scale=0.05), "w8a8_static"),
               ("int4", dict(group_size=64, mode="fast"), "w4_fast"),
               ("int2", dict(group_size=32, mode="fast"), "w23_fast"),
               ("binary", dict(group_size=None, act="binary"), "binary_xnor")]


@pytest.mark.parametrize("fmt,kw,kernel", STE_MATMULS, ids=[c[2] for c in STE_MATMULS])
def test_matmul_ops_that_quantize_x_vs_surrogate(fmt, kw, kernel):
    """SURROGATE (float32 ops): the matmuls that quantize x on the fly take the activation
    quantizer's derivative as 1, so the surrogate is ``x W^T + b`` on the dequantized weight;
    x's and the bias's gradients against its float64 differences. (The kernels linear in x
    are gradchecked in tests/test_autograd.py::test_gradcheck_linear_kernels.)"""
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = QuantLinear.from_float(lin, fmt, **kw)
    assert q.kernel == kernel
    q.bias.requires_grad_(True)
    x = torch.randn(2, 64, requires_grad=True)
    v = torch.randn(2, 8, dtype=D)
    got = backward_of(q(x), [x, q.bias], v)
    w = q.dequantize_weight().to(D)
    want = fd_grads(lambda t, b: t @ w.T + b, [x, q.bias], v)
    close(got, want, rtol=1e-5, atol=1e-5)


def test_qdq_static_activation_clipped_ste():
    """SURROGATE: _QDQ (the ONNX twin's static activation QDQ): clip(x, (qmin - zp - 1/2) s,
    (qmax - zp + 1/2) s), fake_quantize's clipped straight-through estimator."""
    s, zp, qmin, qmax = 0.1, 3, -8, 7
    lo, hi = (qmin - zp - 0.5) * s, (qmax - zp + 0.5) * s
    x = away(torch.linspace(-1.6, 0.8, 41, dtype=D), [lo, hi]).requires_grad_()
    v = torch.randn(41, dtype=D)
    y = qdq._QDQ.apply(x, torch.tensor(s, dtype=D), torch.tensor(zp), qmin, qmax, True)
    close(backward_of(y, [x], v), fd_grads(lambda t: t.clamp(lo, hi), [x], v))


@pytest.mark.parametrize("per_row", [True, False])
def test_qdq_dynamic_activation_ste(per_row):
    """SURROGATE: _DynQDQ (dynamic int8, scale max|x| / 127, nothing clamps): the identity."""
    x = torch.randn(3, 10, dtype=D, requires_grad=True)
    v = torch.randn(3, 10, dtype=D)
    y = qdq._DynQDQ.apply(x, per_row, 17, 2, 10, True)
    close(backward_of(y, [x], v), fd_grads(lambda t: t, [x], v))


@pytest.mark.parametrize("axis,block,zp", [(0, 0, None), (1, 0, True), (1, 4, None),
                                           (0, 0, True)])
def test_qdq_dequantize_scale_gradcheck(axis, block, zp):
    """GRADCHECK: _DQ (DequantizeLinear) is linear in a float scale."""
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(-8, 8, (4, 8), generator=g, dtype=torch.int8)
    n = codes.shape[axis] if not block else 8 // block
    shape = (n,) if not block else (4, n)
    scale = (torch.rand(shape, generator=g, dtype=D) + 0.5).requires_grad_()
    z = torch.randint(-2, 3, shape, generator=g, dtype=torch.int8) if zp else None
    assert torch.autograd.gradcheck(
        lambda s: qdq._DQ.apply(codes, s, z, None, axis, block, 0).to(D), (scale,))


# ------------------------------------------------------------------------------ 1-bit QAT
def test_binaryconnect_clipped_ste():
    """SURROGATE: BinaryConnect sign(w) (deterministic and stochastic): hard tanh
    clip(w, -1, 1), whose derivative is the paper's 1{|w| <= 1}."""
    w = away(torch.linspace(-2, 2, 33, dtype=D), [-1.0, 1.0]).requires_grad_()
    v = torch.randn(33, dtype=D)
    for stochastic in (False, True):
        m = binary.BinaryConnectQuant(stochastic=stochastic).train()
        close(backward_of(m(w), [w], v), fd_grads(htanh, [w], v))


def test_xnor_weight_and_input():
    """SURROGATE: XNOR-Net weights alpha(W) sign(W), alpha = mean|W| per filter: product rule
    with sign's clipped STE, F(W) = alpha(W) sign(W0) + alpha(W0) htanh(W); inputs sign(x) K,
    K = mean|x| per row a constant: F(x) = K0 htanh(x)."""
    torch.manual_seed(3)
    w = away(torch.randn(4, 6, dtype=D), [-1.0, 0.0, 1.0]).requires_grad_()
    v = torch.randn(4, 6, dtype=D)
    w0 = w.detach()
    a0 = w0.abs().mean(1, keepdim=True)
    got = backward_of(binary.XNORWeightQuant()(w), [w], v)
    want = fd_grads(lambda t: t.abs().mean(1, keepdim=True) * torch.sign(w0) + a0 * htanh(t),
                    [w], v)
    close(got, want)
    x = away(torch.randn(3, 7, dtype=D) * 1.5, [-1.0, 1.0]).requires_grad_()
    vx = torch.randn(3, 7, dtype=D)
    k0 = x.detach().abs().mean(-1, keepdim=True)
    close(backward_of(binary.XNORInputQuant()(x), [x], vx),
          fd_grads(lambda t: k0 * htanh(t), [x], vx))


def test_abc_weight_bases():
    """SURROGATE: ABC-Net sum_m alpha_m B_m(W): identity STE for the bases, alpha's gradient
    scaled by g = 1/sqrt(numel): F(W, a) = sum_m (a0_m + g (a_m - a0_m)) B_m(W0)
    + (sum_m a0_m) (W - W0)."""
    torch.manual_seed(4)
    w = torch.randn(3, 5, dtype=D, requires_grad=True)
    m = binary.ABCWeightQuant(3, w.detach().float())
    v = torch.randn(3, 5, dtype=D)
    b0 = m.bases(w.detach()).to(D)
    a0 = m.alpha.detach().to(D)
    g = w.numel() ** -0.5

    def surrogate(t, a):
        a_s = a0 + g * (a - a0)
        return (a_s.reshape(-1, 1, 1) * b0).sum(0) + a0.sum() * (t - w.detach())

    close(backward_of(m(w), [w, m.alpha], v), fd_grads(surrogate, [w, m.alpha], v), rtol=1e-5)


def test_abc_input_bases():
    """SURROGATE: ABC-Net sum_n beta_n H_{v_n}(x): STE 1{0 <= x + v <= 1} to x and v_n,
    beta and v with gradient scale g = 1/sqrt(numel): F(x, v, b) = sum_n b'_n H_n(x0, v0)
    + b0_n (clip(x + v'_n, 0, 1) - clip(x0 + v0_n, 0, 1)), p' = p0 + g (p - p0)."""
    torch.manual_seed(5)
    x = torch.rand(4, 6, dtype=D) * 1.2 - 0.1
    m = binary.ABCInputQuant(2)
    m.init_from(x)
    shifts = m.shift.detach().to(D)
    x = away(x, [-s for s in shifts.tolist()] + [1 - s for s in shifts.tolist()])
    x.requires_grad_()
    v = torch.randn(4, 6, dtype=D)
    x0, b0, g = x.detach(), m.beta.detach().to(D), x.numel() ** -0.5
    h0 = [torch.where((x0 + s).clamp(0, 1) - 0.5 >= 0, 1.0, -1.0).to(D) for s in shifts]

    def surrogate(t, sh, be):
        out = 0
        for n in range(2):
            vn = shifts[n] + g * (sh[n] - shifts[n])
            bn = b0[n] + g * (be[n] - b0[n])
            out = out + bn * h0[n] + b0[n] * ((t + vn).clamp(0, 1) - (x0 + shifts[n]).clamp(0, 1))
        return out

    got = backward_of(m(x), [x, m.shift, m.beta], v)
    close(got, fd_grads(surrogate, [x, m.shift, m.beta], v), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ TTQ, INQ, DoReFa, PACT
def test_ttq_scales_gradcheck_and_latent_surrogate():
    """GRADCHECK: _TTQFn is linear in W_p, W_n (paper eq. 7: sums over the regions).
    SURROGATE for the latent weight (eq. 8): F(w) = W_p0 w on {w > delta}, w on the zero
    region, W_n0 w on {w < -delta}."""
    torch.manual_seed(6)
    w = torch.randn(20, dtype=D)
    delta = 0.05 * w.abs().max()
    w = away(w, [-float(delta), float(delta)]).requires_grad_()
    wp = torch.tensor(0.7, dtype=D, requires_grad=True)
    wn = torch.tensor(1.3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, n: ttq._TTQFn.apply(w.detach(), p, n, delta),
                                    (wp, wn))
    v = torch.randn(20, dtype=D)
    pos, neg = w.detach() > delta, w.detach() < -delta
    scale = torch.where(pos, 0.7, torch.where(neg, 1.3, 1.0)).to(D)
    close(backward_of(ttq._TTQFn.apply(w, wp, wn, delta), [w], v),
          fd_grads(lambda t: scale * t, [w], v))


def test_inq_gradcheck():
    """GRADCHECK: INQ's where(fixed, P(w), w) is smooth in w (0 on the fixed part)."""
    torch.manual_seed(7)
    w = torch.nn.Parameter(torch.randn(4, 5))
    m = inq.INQQuant(4, w.detach())
    m.step(w)
    wd = w.detach().to(D).requires_grad_()
    assert torch.autograd.gradcheck(m, (wd,))


def test_dorefa_weights_and_activations():
    """SURROGATE (float32 forward): DoReFa weights 2 quantize_k(r) - 1, r = tanh(w) /
    (2 max|tanh w|) + 1/2, with STE round: F(w) = tanh(w) / max|tanh w| (through the max);
    activations quantize_k(clip(x, 0, 1)): F(x) = clip(x, 0, 1)."""
    torch.manual_seed(8)
    w = torch.randn(3, 5, requires_grad=True)
    v = torch.randn(3, 5, dtype=D)
    got = backward_of(dorefa.DoReFaWeightQuant(4)(w), [w], v)
    want = fd_grads(lambda t: torch.tanh(t) / torch.tanh(t).abs().max(), [w], v)
    close(got, want, rtol=1e-5, atol=1e-6)
    x = away(torch.linspace(-0.5, 1.5, 21), [0.0, 1.0]).requires_grad_()
    vx = torch.randn(21, dtype=D)
    close(backward_of(dorefa.DoReFaActQuant(3)(x), [x], vx),
          fd_grads(lambda t: t.clamp(0, 1), [x], vx))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dorefa_gradient_quantizer(bits):
    """_GradQuantFn: the forward is the identity (finite differences: the upstream gradient);
    the backward is DoReFa's eq. 12 without noise, 2 m [round((g / 2m + 1/2)(2^k - 1)) /
    (2^k - 1) - 1/2], m = max|g| per sample, written here in numpy; the two differ by at most
    half a step m / (2^k - 1)."""
    torch.manual_seed(9)
    x = torch.randn(3, 8, dtype=D, requires_grad=True)
    g = torch.randn(3, 8, dtype=D)
    (got,) = backward_of(dorefa.DoReFaGradQuant(bits)(x), [x], g)
    gn = g.numpy()
    m = np.abs(gn).max(1, keepdims=True)
    n = 2 ** bits - 1
    want = 2 * m * (np.round((gn / (2 * m) + 0.5) * n) / n - 0.5)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    (fd,) = fd_grads(lambda t: t, [x], g)
    assert float((got - fd).abs().max()) <= float(m.max()) / n * (1 + 1e-9)


def test_pact_clip_and_alpha():
    """SURROGATE: PACT y_q with STE round: F(x, alpha) = clip(x, 0, alpha), so d/dx = 1 on
    [0, alpha), d/dalpha = 1{x >= alpha} (the paper's eq. 3)."""
    m = pact.PACTQuant(4, alpha=1.5)
    x = away(torch.linspace(-1, 3, 41, dtype=D), [0.0, 1.5]).requires_grad_()
    v = torch.randn(41, dtype=D)
    got = backward_of(m(x), [x, m.alpha], v)
    want = fd_grads(lambda t, a: torch.minimum(t.clamp(min=0), a), [x, m.alpha], v)
    close(got, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- LSQ, LSQ+, STE
def test_ste_round_and_grad_scaled_float64():
    """SURROGATE: ste_round(t): t + (round(t0) - t0); grad_scaled(p, g): p0 + g (p - p0)."""
    t = torch.randn(12, dtype=D, requires_grad=True)
    v = torch.randn(12, dtype=D)
    c = (t.detach().round() - t.detach())
    close(backward_of(ste_round(t), [t], v), fd_grads(lambda u: u + c, [t], v))
    p0 = t.detach()
    close(backward_of(grad_scaled(t, 0.3), [t], v),
          fd_grads(lambda u: p0 + 0.3 * (u - p0), [t], v))


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("offset", [False, True])
def test_lsq_fake_quantize_vs_paper_surrogate(axis, offset):
    """SURROGATE (float32 forward): LSQ / LSQ+ v_hat = round(clamp((v - b)/s, -Q_N, Q_P)) s + b
    with STE round and gradient scale g = 1/sqrt(N Q_P) on s and b: F(v, s, b) =
    (clamp((v - b')/s', -Q_N, Q_P) + round(c0) - c0) s' + b', p' = p0 + g (p - p0); its
    differences give the paper's d/ds = g (round(v/s) - v/s) inside, g(-Q_N) / g Q_P outside."""
    torch.manual_seed(10)
    q_n, q_p = 8, 7
    v = torch.randn(3, 6) * 2
    s = torch.tensor([0.3, 0.25, 0.4]) if axis == 0 else torch.tensor(0.3)
    b = (torch.tensor([0.1, -0.2, 0.05]) if axis == 0 else torch.tensor(0.1)) if offset else None
    shape = (3, 1) if axis == 0 else ()
    bb = torch.zeros(shape) if b is None else b.reshape(shape)
    t = (v - bb) / s.reshape(shape)
    v = away(t, [-q_n, q_p], gap=1e-2) * s.reshape(shape) + bb  # off the clamp's corners
    v.requires_grad_()
    s.requires_grad_()
    ins = [v, s] + ([b.requires_grad_()] if offset else [])
    n_per = v.numel() // (3 if axis == 0 else 1)
    g = 1 / math.sqrt(n_per * q_p)
    s0, b0 = s.detach().to(D).reshape(shape), bb.detach().to(D)
    c0 = ((v.detach().to(D) - b0) / s0).clamp(-q_n, q_p)
    rc = c0.round() - c0

    def surrogate(x, sc, *ob):
        sp = s0 + g * (sc.reshape(shape) - s0)
        bp = b0 + g * (ob[0].reshape(shape) - b0) if ob else b0
        return (((x - bp) / sp).clamp(-q_n, q_p) + rc) * sp + bp

    vg = torch.randn(3, 6, dtype=D)
    got = backward_of(lsq_fake_quantize(v, s, q_n, q_p, axis=axis, offset=b), ins, vg)
    close(got, fd_grads(surrogate, ins, vg), rtol=2e-4, atol=2e-5)


def test_fake_quantize_clipped_ste():
    """SURROGATE: qkern.fake_quantize (int4, given scale): clip(x, (qmin - 1/2) s,
    (qmax + 1/2) s)."""
    s = 0.25
    lo, hi = -8.5 * s, 7.5 * s
    x = away(torch.linspace(-3, 3, 37, dtype=D), [lo, hi]).requires_grad_()
    v = torch.randn(37, dtype=D)
    y = qkern.fake_quantize(x, "int4", scale=torch.tensor(s))
    close(backward_of(y, [x], v), fd_grads(lambda t: t.clamp(lo, hi), [x], v))
