"""DoReFa, TTQ and INQ (QATConfig(method="dorefa" / "ttq" / "inq")): each rule against the
papers' formulas written here independently (numpy / plain torch), the converted model equal
to the fake-quantized one on qkern's formats (int{k} midrise, ternary, log2_b), INQ's schedule
and its refusal to convert early, and the config errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import qkern
from qkern.quantization import QATConfig, inq_step
from qkern.quantization.qat import (
    DoReFaActQuant,
    DoReFaWeightQuant,
    INQQuant,
    QATLinear,
    TTQQuant,
    dorefa_quantize_grad,
)


def _convert(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dequant fallbacks
        return qkern.convert(model)


def _train(model, x, steps=3, lr=1e-2):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 10))


# ---- DoReFa ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_dorefa_weights_follow_eq9(k):
    """w_k = 2 quantize_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1, STE for round."""
    torch.manual_seed(k)
    w = torch.randn(16, 32, dtype=torch.float64)
    L = 2 ** k - 1
    t = np.tanh(w.numpy())
    ref = 2 * np.round((t / (2 * np.abs(t).max()) + 0.5) * L) / L - 1
    wq = DoReFaWeightQuant(k)
    wt = w.float().requires_grad_()
    out = wq(wt)
    np.testing.assert_allclose(out.detach().numpy(), ref, atol=1e-6)
    # the values are odd multiples of 1/L: no zero level
    assert np.allclose(np.round((ref * L - 1) / 2), (ref * L - 1) / 2)
    assert not np.any(np.isclose(ref, 0))
    # gradient: STE through round, autograd through tanh and the max (written independently)
    g = torch.randn(16, 32)
    (out * g).sum().backward()
    w2 = w.float().clone().requires_grad_()
    tt = torch.tanh(w2)
    r = tt / (2 * tt.abs().max()) + 0.5
    (2 * (r + (torch.round(r * L) / L - r).detach()) - 1).mul(g).sum().backward()
    torch.testing.assert_close(wt.grad, w2.grad, rtol=1e-4, atol=1e-6)


def test_dorefa_activations_clip_to_unit_range():
    torch.manual_seed(0)
    x = (torch.randn(200) * 0.8 + 0.5).requires_grad_()
    q = DoReFaActQuant(3)
    y = q(x)
    xs = x.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), np.round(np.clip(xs, 0, 1) * 7) / 7,
                               atol=1e-6)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), ((xs >= 0) & (xs <= 1)).astype(np.float32))


def test_dorefa_gradient_bits_follow_eq12_without_noise():
    torch.manual_seed(0)
    g = torch.randn(4, 10)
    k = 4
    gn = g.numpy().astype(np.float64)
    m = np.abs(gn).max(axis=1, keepdims=True)
    ref = 2 * m * (np.round((gn / (2 * m) + 0.5) * 15) / 15 - 0.5)
    np.testing.assert_allclose(dorefa_quantize_grad(g, k).numpy(), ref, rtol=1e-5, atol=1e-6)
    # inside a layer: the weight gradient is built from the quantized output gradient
    model = qkern.prepare(nn.Sequential(nn.Linear(6, 10)),
                          QATConfig(weight=2, activation=None, method="dorefa", grad_bits=k))
    lin = model[0]
    x = torch.rand(4, 6)
    (lin(x) * g).sum().backward()
    xq = x  # weight-only: the input is not quantized
    ref_w = torch.from_numpy(ref).float().T @ xq
    # d w_k / d w through tanh: compare the gradient of the fake weight instead
    w = lin.weight.detach().clone().requires_grad_()
    (DoReFaWeightQuant(2)(w) * ref_w).sum().backward()
    torch.testing.assert_close(lin.weight.grad, w.grad, rtol=1e-4, atol=1e-6)


def test_dorefa_gradient_noise_follows_eq12():
    """With the paper's noise N(k) = sigma / (2^k - 1), sigma ~ U(-1/2, 1/2): the same
    noise drawn here (same seed) gives the same values; every value lies on the k-bit grid
    of 2 m [i / (2^k - 1) - 1/2]; the rounding is unbiased (the mean over many draws is dr,
    which the deterministic rounding misses)."""
    g = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    k, levels = 2, 3
    gn = g.numpy().astype(np.float64)
    m = np.abs(gn).max(axis=1, keepdims=True)
    torch.manual_seed(5)
    got = dorefa_quantize_grad(g, k, noise=True)
    torch.manual_seed(5)
    sigma = (torch.rand(3, 7) - 0.5).numpy().astype(np.float64)
    ref = 2 * m * (np.round((gn / (2 * m) + 0.5) * levels + sigma) / levels - 0.5)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)
    i = (got.numpy() / (2 * m) + 0.5) * levels
    np.testing.assert_allclose(i, np.round(i), atol=1e-4)
    mean = torch.stack([dorefa_quantize_grad(g, k, noise=True) for _ in range(4000)]).mean(0)
    assert float((mean - g).abs().max()) < 0.05 * float(g.abs().max())
    assert float((dorefa_quantize_grad(g, k) - g).abs().max()) > 0.1 * float(g.abs().max())
    # through QATConfig: stochastic=True turns the noise on (dorefa with grad_bits only)
    model = qkern.prepare(nn.Sequential(nn.Linear(6, 7)), QATConfig(
        weight=2, activation=None, method="dorefa", grad_bits=k, stochastic=True))
    assert any(getattr(mod, "noise", False) for mod in model.modules())
    with pytest.raises(ValueError, match="stochastic"):
        QATConfig(weight=2, method="dorefa", stochastic=True)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_dorefa_converts_to_the_midrise_grid_exactly(k):
    x = torch.rand(16, 64)
    m = qkern.prepare(_mlp(), QATConfig(weight=k, activation=2, method="dorefa"))
    _train(m, x)
    m.eval()
    with torch.no_grad():
        fake_w = m[0].weight_fake(m[0].weight)
        fake = m(x)
        d = _convert(m)
        qw = d[0].module.quantized_weight()
        if k == 1:  # the dequant path: qkern's int1 midrise grid
            assert qw.quantizer == "midrise" and qw.format.name == "int1"
        else:  # the fused int2/3/4 kernels: (u - z) s with the float zero z = 2^(k-1) - 1/2
            assert qw.format.name == f"uint{k}" and d[0].module.kernel != "dequant"
            torch.testing.assert_close(qw.zero_point, torch.full_like(qw.zero_point,
                                                                      2 ** (k - 1) - 0.5))
        assert torch.equal(d[0].module.dequantize_weight(), fake_w)
        torch.testing.assert_close(d(x), fake, rtol=0, atol=1e-6)


# ---- TTQ ---------------------------------------------------------------------------------


def test_ttq_forward_and_gradients_follow_the_paper():
    torch.manual_seed(0)
    w0 = torch.randn(8, 16)
    q = TTQQuant(w0, 0.05)
    with torch.no_grad():
        q.w_p.fill_(0.7)
        q.w_n.fill_(1.3)
    w = w0.clone().requires_grad_()
    out = q(w)
    wn = w0.numpy()
    d = 0.05 * np.abs(wn).max()
    pos, neg = wn > d, wn < -d
    np.testing.assert_allclose(out.detach().numpy(), 0.7 * pos - 1.3 * neg, atol=1e-6)
    g = torch.randn(8, 16)
    (out * g).sum().backward()
    gn = g.numpy()
    np.testing.assert_allclose(w.grad.numpy(),
                               np.where(pos, 0.7 * gn, np.where(neg, 1.3 * gn, gn)), rtol=1e-6)
    np.testing.assert_allclose(float(q.w_p.grad), gn[pos].sum(), rtol=1e-5)
    np.testing.assert_allclose(float(q.w_n.grad), -gn[neg].sum(), rtol=1e-5)
    # init: the mean |w| of each region
    q2 = TTQQuant(w0, 0.05)
    assert float(q2.w_p.detach()) == pytest.approx(wn[pos].mean(), rel=1e-5)
    assert float(q2.w_n.detach()) == pytest.approx(-wn[neg].mean(), rel=1e-5)


@pytest.mark.parametrize("make,act", [(_mlp, None), (_mlp, 4), (_cnn, None)])
def test_ttq_converts_to_two_ternary_layers(make, act):
    x = torch.rand(16, 64) if make is _mlp else torch.rand(4, 2, 6, 6)
    m = qkern.prepare(make(), QATConfig(weight=2, activation=act, method="ttq"))
    _train(m, x)
    m.eval()
    with torch.no_grad():
        fake_w = m[0].weight_fake(m[0].weight).reshape(m[0].weight.shape[0], -1)
        fake = m(x)
        d = _convert(m)
        out = d(x)
    pair = d[0] if act is None else d[0].module
    assert isinstance(pair, qkern.quantization.ParallelSum)
    lins = [getattr(p, "qlinear", p) for p in pair.parts]
    wsum = sum(q.dequantize_weight() for q in lins)
    assert all(q.kernel == "ternary" for q in lins)
    torch.testing.assert_close(out, fake, rtol=1e-5, atol=1e-5)
    assert torch.equal(wsum, fake_w) and wsum.unique().numel() == 3


def test_ttq_equal_scales_deploy_as_one_layer():
    x = torch.rand(8, 64)
    m = qkern.prepare(_mlp(), QATConfig(weight=2, activation=None, method="ttq"))
    for q in m.modules():
        if isinstance(q, TTQQuant):
            with torch.no_grad():
                q.w_n.copy_(q.w_p)
    with torch.no_grad():
        fake = m(x)
        d = _convert(m)
    assert type(d[0]).__name__ == "QuantLinear" and d[0].kernel == "ternary"
    torch.testing.assert_close(d(x), fake, rtol=1e-5, atol=1e-6)


# ---- INQ ---------------------------------------------------------------------------------


def _inq_ref(w: np.ndarray, bits: int) -> np.ndarray:
    """The paper's eq. 4 with P_l from eqs. 2-3, element by element."""
    s = np.abs(w).max()
    n1 = int(np.floor(np.log2(4 * s / 3)))
    n2 = n1 + 1 - 2 ** (bits - 1) // 2
    p = [0.0] + [2.0 ** n for n in range(n2, n1 + 1)]
    out = np.zeros_like(w)
    for i, v in np.ndenumerate(w):
        for a, b in zip(p[:-1], p[1:]):
            if (a + b) / 2 <= abs(v) < 3 * b / 2:
                out[i] = b * np.sign(v)
    return out


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_inq_schedule_fixes_largest_first_to_powers_of_two(bits):
    torch.manual_seed(bits)
    lin = nn.Linear(40, 10)
    x = torch.randn(5, 40)
    m = qkern.prepare(nn.Sequential(lin), QATConfig(weight=bits, activation=None,
                                                    method="inq"))
    w0 = m[0].weight.detach().clone().numpy()
    q = m[0].weight_fake
    assert isinstance(q, INQQuant)
    fractions = []
    for _ in range(4):
        before = q.fixed.clone().numpy()
        w_before = m[0].weight.detach().clone().numpy()
        fractions.append(inq_step(m))
        newly = q.fixed.numpy() & ~before
        rest = ~q.fixed.numpy()
        if rest.any():  # the new part: the largest magnitudes among the not-yet-fixed
            assert np.abs(w_before[newly]).min() >= np.abs(w_before[rest]).max()
        want = _inq_ref(w0, bits)[newly] if not before.any() else \
            _inq_ref_partial(w0, w_before, newly, bits)
        np.testing.assert_array_equal(q.values.numpy()[newly], want)
        np.testing.assert_array_equal(m[0].weight.detach().numpy()[q.fixed.numpy()],
                                      q.values.numpy()[q.fixed.numpy()])
        assert int(q.fixed.sum()) == round(fractions[-1] * w0.size)
        if fractions[-1] < 1:  # retrain: the fixed part gets no gradient
            m.zero_grad()
            m(x).square().sum().backward()
            assert bool((m[0].weight.grad[q.fixed] == 0).all())
            assert bool((m[0].weight.grad[~q.fixed] != 0).any())
            with torch.no_grad():
                m[0].weight.sub_(1e-3 * m[0].weight.grad)
    assert fractions == [0.5, 0.75, 0.875, 1.0]
    with pytest.raises(ValueError, match="complete"):
        inq_step(m)


def _inq_ref_partial(w0, w_now, newly, bits):
    """The grid is the one of the float weight (n1 from its max); the values those of the
    weights when fixed."""
    s = np.abs(w0).max()
    n1 = int(np.floor(np.log2(4 * s / 3)))
    n2 = n1 + 1 - 2 ** (bits - 1) // 2
    p = [0.0] + [2.0 ** n for n in range(n2, n1 + 1)]
    out = []
    for v in w_now[newly]:
        r = p[-1] * np.sign(v) if abs(v) >= 1.5 * p[-1] else 0.0
        for a, b in zip(p[:-1], p[1:]):
            if (a + b) / 2 <= abs(v) < 3 * b / 2:
                r = b * np.sign(v)
        out.append(r)
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("make,bits,act", [(_mlp, 4, None), (_mlp, 3, 4), (_cnn, 5, None)])
def test_inq_refuses_early_convert_then_deploys_exactly_on_log2(make, bits, act):
    x = torch.rand(16, 64) if make is _mlp else torch.rand(4, 2, 6, 6)
    m = qkern.prepare(make(), QATConfig(weight=bits, activation=act, method="inq"))
    m(x)
    for _ in range(3):
        inq_step(m)
        _train(m, x, steps=2, lr=1e-3)
    with pytest.raises(ValueError, match=r"87.5 % .*inq_step"):
        qkern.convert(m)
    inq_step(m)
    m.eval()
    with torch.no_grad():
        fake = m(x)
        d = _convert(m)
        out = d(x)
    torch.testing.assert_close(out, fake, rtol=1e-5, atol=1e-6)
    tops = [getattr(c, "module", c) for c in d]  # ActQuant -> its layer
    qmods = [q for q in tops if type(q).__name__ in ("QuantLinear", "QuantConv2d")]
    assert len(qmods) == 2
    for mod, qm in zip([mm for mm in m.modules() if isinstance(mm, INQQuant)], qmods):
        ql = getattr(qm, "qlinear", qm)
        assert torch.equal(ql.dequantize_weight().reshape(mod.values.shape), mod.values)
        assert ql.weight_q.format.name == f"log2_{bits}"
        v = mod.values[mod.values != 0].abs()
        assert torch.equal(v, torch.exp2(torch.log2(v).round()))


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,field", [
    ({"method": "ttq", "weight": 3}, "weight"),
    ({"method": "ttq", "weight": 1}, "weight"),
    ({"method": "inq", "weight": 1}, "weight"),
    ({"method": "dorefa", "weight": 9}, "weight"),
    ({"method": "lsq", "weight": 1}, "weight"),
    ({"method": "lsq", "grad_bits": 8}, "grad_bits"),
    ({"method": "dorefa", "grad_bits": 1}, "grad_bits"),
    ({"method": "dorefa", "act_signed": True}, "act_signed"),
    ({"method": "ttq", "weight": 2, "ttq_threshold": 0.0}, "ttq_threshold"),
    ({"method": "inq", "inq_schedule": (0.5, 0.4, 1.0)}, "inq_schedule"),
    ({"method": "inq", "inq_schedule": (0.5, 0.9)}, "inq_schedule"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"QATConfig\.{field}"):
        QATConfig(**kw)


def test_inq_step_without_inq_layers():
    m = qkern.prepare(_mlp(), QATConfig(weight=4, activation=None, method="lsq"))
    with pytest.raises(ValueError, match="no INQ layer"):
        inq_step(m)
    assert isinstance(m[0], QATLinear)


@pytest.mark.parametrize("cfg", [
    QATConfig(weight=2, activation=2, method="dorefa"),
    QATConfig(weight=2, activation=4, method="ttq"),
    QATConfig(weight=3, activation=None, method="inq"),
])
def test_converted_models_save_and_load(cfg, tmp_path):
    """qkern.save / qkern.load keep the midrise grid, TTQ's ParallelSum and log2 weights."""
    x = torch.rand(8, 64)
    m = qkern.prepare(_mlp(), cfg)
    if cfg.method == "inq":
        for _ in range(4):
            inq_step(m)
    m(x)
    m.eval()
    d = _convert(m)
    qkern.save(d, tmp_path / "m.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = qkern.load(tmp_path / "m.safetensors", _mlp)
    with torch.no_grad():
        assert torch.equal(back(x), d(x))
    assert type(back[0]) is type(d[0])
