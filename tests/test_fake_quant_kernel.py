"""qkern::lsq_fake_quantize (the fused LSQ / LSQ+ kernel, csrc/cpu/fakequant) against the LSQ
(Esser et al. 2020) and LSQ+ (Bhalgat et al. 2020) formulas written here, and against torch's
own learnable fake quantization ops: forward and the three gradients on every ISA, per tensor /
per channel (axis 0, 1, last) / group-wise, with and without offset, ties and clip bounds;
bit-identical ISAs and thread counts; finite differences in the clipped region;
torch.compile; errors."""

from __future__ import annotations

import math

import pytest
import torch

import qkern
from _util import assert_bits_equal
from qkern import _C
from qkern.observers.lsq import lsq_fake_quantize

fq = torch.ops.qkern.lsq_fake_quantize
ISAS = ["scalar", "avx2", "avx512"]
HAS = {"scalar": True, "avx2": _C.cpu_has_avx2(), "avx512": _C.cpu_has_avx512()}
Q_N, Q_P = 8, 7  # int4

# (name, shape of x, axis, view): group-wise is per channel along axis 0 of x viewed as
# (rows * groups, group); odd sizes leave tails after the 8- and 16-float SIMD loops; the
# per-tensor 40013 spans three 16384-element runs of the backward's sums.
LAYOUTS = [
    ("tensor", (1003,), None, None),
    ("tensor_runs", (7, 5717), None, None),
    ("axis0", (13, 37), 0, None),
    ("axis1", (3, 19, 11), 1, None),
    ("last", (9, 35), -1, None),
    ("group", (6, 96), 0, (18, 32)),
]


def _isa(isa: str) -> None:
    if not HAS[isa]:
        pytest.skip(f"this CPU has no {isa}")
    qkern.set_isa(isa)


def _case(shape, axis, view, offset: bool, pow2: bool, seed: int = 0):
    """x, scale, offset (or None), grad_y and the kernel's axis. pow2: power-of-two scales and
    offsets on a 1/8 grid, so that (x - beta) / s is exact and the ties k + 1/2 and the clip
    bounds -Q_N, Q_P planted in x are hit exactly."""
    g = torch.Generator().manual_seed(seed)
    xs = view or shape
    c = 1 if axis is None else xs[axis]
    if pow2:
        s = 2.0 ** torch.randint(-3, 2, (c,), generator=g).float()
        b = torch.randint(-8, 9, (c,), generator=g).float() / 8
    else:
        s = torch.rand(c, generator=g) * 0.5 + 0.05
        b = torch.randn(c, generator=g) * 0.3
    b = b if offset else torch.zeros(c)
    bshape = [1] * len(xs)
    if axis is not None:
        bshape[axis] = c
    t = torch.randn(xs, generator=g) * 6  # in units of the step size: inside and outside
    k = torch.randint(-Q_N - 3, Q_P + 3, xs, generator=g).float()
    pick = torch.randint(0, 4, xs, generator=g)
    t = torch.where(pick == 1, k + 0.5, t)  # ties
    t = torch.where(pick == 2, torch.where(k < 0, -Q_N, Q_P).float(), t)  # the clip bounds
    x = (t * s.reshape(bshape) + b.reshape(bshape)).reshape(shape)
    gy = torch.randn(shape, generator=g)
    s = s if axis is not None else s.reshape(())
    b = (b if axis is not None else b.reshape(())) if offset else None
    return x, s, b, gy, axis


def _ref(x, s, b, gy, axis, g):
    """The LSQ / LSQ+ formulas on x viewed with its channels: t = (x - beta) * (1/s) in float32
    (as the kernel), y = round(clamp(t)) * s + beta; d y/d x = 1 for -Q_N <= t <= Q_P (bounds
    included, torch.clamp's gradient rule; the paper leaves the measure-zero bounds open);
    d y/d s = round(t) - t inside, -Q_N below, Q_P above (LSQ eq. 3); d y/d beta = 0 inside, 1
    outside (LSQ+ eq. 6); the s and beta gradients times g, summed in float64."""
    shape = [1] * x.dim()
    dims = list(range(x.dim()))
    if axis is not None:
        shape[axis] = x.shape[axis]
        dims.remove(axis % x.dim())
    sv = s.reshape(shape)
    bv = torch.zeros(()) if b is None else b.reshape(shape)
    t = (x - bv) * sv.reciprocal()
    q = t.clamp(-Q_N, Q_P).round()
    y = q * sv + bv if b is not None else q * sv
    below, above = t < -Q_N, t > Q_P
    inside = ~below & ~above
    term = torch.where(below, -float(Q_N), torch.where(above, float(Q_P), q - t)).double()
    gs = g * (gy.double() * term).sum(dims)
    gb = g * (gy.double() * (below | above)).sum(dims)
    # the float64 sums' own error bound, for the tolerances
    err_s = g * (gy.double() * term).abs().sum(dims) * 1e-12
    err_b = g * gy.double().abs().sum(dims) * 1e-12
    gx = torch.where(inside, gy, 0.0)
    return t, y, gx, gs.reshape(s.shape), gb.reshape(s.shape), err_s, err_b


def _run(x, s, b, gy, axis, g):
    """y and the three gradients of the op through autograd."""
    xs, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
    bs = None if b is None else b.clone().requires_grad_()
    y = fq(xs, ss, bs, axis, Q_N, Q_P, g)
    y.backward(gy)
    return y.detach(), xs.grad, ss.grad, (None if b is None else bs.grad)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[v[0] for v in LAYOUTS])
@pytest.mark.parametrize("offset", [False, True], ids=["lsq", "lsq+"])
@pytest.mark.parametrize("pow2", [True, False], ids=["ties", "rand"])
def test_matches_lsq_formulas(isa, layout, offset, pow2):
    _isa(isa)
    _, shape, axis, view = layout
    x, s, b, gy, ax = _case(shape, axis, view, offset, pow2)
    xv, gv = (x, gy) if view is None else (x.reshape(view), gy.reshape(view))
    n_per = xv.numel() // s.numel()
    g = 1.0 / math.sqrt(n_per * Q_P)
    y, gx, gs, gb = _run(xv, s, b, gv, ax, g)
    t, ry, rgx, rgs, rgb, es, eb = _ref(xv, s, b, gv, ax, g)
    assert_bits_equal(y, ry, "y")
    assert_bits_equal(gx, rgx, "grad_x")
    _close(gs, rgs, es, "grad_scale")
    if offset:
        _close(gb, rgb, eb, "grad_offset")
    if pow2:  # the planted ties and bounds were hit exactly
        assert bool(((t - t.floor()) == 0.5).any()) and bool((t == Q_P).any())
        assert bool((t == -Q_N).any())


def _close(got, want, err, what: str) -> None:
    """float32 result of a float64 sum: the sum's error bound plus the final rounding."""
    got, want, err = got.double().reshape(-1), want.reshape(-1), err.reshape(-1)
    bad = (got - want).abs() > err + want.abs() * 2**-23
    assert not bool(bad.any()), (what, got[bad][:4], want[bad][:4])


def test_isas_and_thread_counts_agree_bit_for_bit():
    """The same float operations everywhere, and the sums in an order fixed by the shape
    (csrc/cpu/fakequant/api.h): results equal bit for bit across ISAs and thread counts. The
    shapes split into several tasks (runs of 16384, rows of the last axis)."""
    cases = [((3, 40013), None, None, True), ((64, 2048), 0, None, True),
             ((600, 70), -1, None, True), ((8, 4096), 0, (256, 128), False)]
    for shape, axis, view, offset in cases:
        x, s, b, gy, ax = _case(shape, axis, view, offset, pow2=False, seed=1)
        if view is not None:
            x, gy = x.reshape(view), gy.reshape(view)
        want = None
        for isa in [i for i in ISAS if HAS[i]]:
            for threads in (1, 2, 5):
                qkern.set_isa(isa)
                qkern.set_num_threads(threads)
                got = [t for t in _run(x, s, b, gy, ax, 0.01) if t is not None]
                want = want or got
                for a, w, what in zip(got, want, ("y", "grad_x", "grad_scale", "grad_offset")):
                    assert_bits_equal(a, w, f"{shape} {isa} x{threads} {what}")


def _torch_case(per_channel: bool):
    """Data where torch's rule and LSQ's agree: torch takes the clip masks on round(t) (an
    element within half a step outside the range counts as inside), LSQ on t; no t in
    (Q_P, Q_P + 1/2] or [-Q_N - 1/2, -Q_N)."""
    x, s, _, gy, ax = _case((12, 33), 1 if per_channel else None, None, False, pow2=False,
                            seed=3)
    shape = [1, -1] if per_channel else []
    t = x * s.reshape(shape).reciprocal()  # as both kernels compute it
    near = ((t > Q_P) & (t <= Q_P + 0.5)) | ((t < -Q_N) & (t >= -Q_N - 0.5))
    x = torch.where(near, x * 3, x)
    return x, s, gy, ax


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_matches_torch_learnable_fake_quantize(per_channel):
    """torch._fake_quantize_learnable_per_{tensor,channel}_affine with zero_point 0 and
    grad_factor g: the same x * (1/s), half-to-even rounding and clip; its zero point's
    gradient is -s * (ours for beta): beta = -zero_point * s."""
    x, s, gy, ax = _torch_case(per_channel)
    g = 0.05
    xs, ss = x.clone().requires_grad_(), s.clone().reshape(-1).requires_grad_()
    zp = torch.zeros(ss.shape, requires_grad=True)
    if per_channel:
        yt = torch._fake_quantize_learnable_per_channel_affine(xs, ss, zp, 1, -Q_N, Q_P, g)
    else:
        yt = torch._fake_quantize_learnable_per_tensor_affine(xs, ss, zp, -Q_N, Q_P, g)
    yt.backward(gy)
    y, gx, gs, gb = _run(x, s, torch.zeros_like(s), gy, ax, g)
    assert_bits_equal(y, yt.detach(), "y")
    assert torch.equal(gx, xs.grad)  # values: torch's 0 * negative grad is -0, ours +0
    tol = 1e-5 * (g * gy.abs().sum() * Q_N).item()  # torch sums in float32
    torch.testing.assert_close(gs.reshape(-1), ss.grad, rtol=0, atol=tol)
    torch.testing.assert_close(-s.reshape(-1) * gb.reshape(-1), zp.grad, rtol=0, atol=tol)
    assert float(gb.abs().sum()) > 0 and float(gs.abs().sum()) > 0  # both regions present


@pytest.mark.parametrize("offset", [False, True], ids=["lsq", "lsq+"])
def test_lsq_fake_quantize_takes_the_kernel_and_agrees_with_its_formula(offset):
    """float32 CPU goes through the kernel, other tensors through the torch formula of
    observers/lsq.py; on the same float32 data the two give the same y values and the
    gradients up to float32 rounding (the formula's grad_x is (grad * s) * (1 / s), its scale
    gradient a float32 sum of two terms)."""
    x, s, b, gy, ax = _case((16, 24), 1, None, offset, pow2=False, seed=4)
    out = []
    for use_kernel in (True, False):
        xs, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
        bs = b.clone().requires_grad_() if offset else None
        y = lsq_fake_quantize(xs, ss, Q_N, Q_P, axis=ax, offset=bs, kernel=use_kernel)
        assert ("fake_quantize" in y.grad_fn.name().lower()) == use_kernel, y.grad_fn.name()
        y.backward(gy)
        out.append([y.detach(), xs.grad, ss.grad] + ([bs.grad] if offset else []))
    y64 = lsq_fake_quantize(x.double(), s.double().requires_grad_(), Q_N, Q_P, axis=ax)
    assert "fake_quantize" not in y64.grad_fn.name().lower()  # float64: the formula
    # equal values; the formula's ste_round, (round(t) - t) + t, turns round's -0 into +0
    assert torch.equal(out[0][0], out[1][0])
    for a, w in zip(out[0][1:], out[1][1:]):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)


def test_finite_differences_in_the_clipped_region():
    """Where the op is differentiable with its true derivative equal to LSQ's: every element
    outside the clip range, y = -Q_N s + beta or Q_P s + beta (linear in s and beta, flat in
    x). Inside, LSQ's gradients are straight-through surrogates (the true derivative of round is
    0), so gradcheck only applies here, with grad_factor 1. The kernel is float32, so gradcheck
    runs on float32 inputs with eps 1e-2 (y is linear there: the differences are exact up to
    float32 rounding) and a matching tolerance instead of float64's."""
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.rand(20, generator=g) + 9.0, -torch.rand(20, generator=g) - 10.0])
    x = x.reshape(8, 5).requires_grad_()
    s = torch.full((5,), 1.0, requires_grad=True)
    b = torch.full((5,), 0.25, requires_grad=True)
    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(lambda *a: fq(*a, 1, Q_N, Q_P, 1.0), (x, s, b),
                                        eps=1e-2, atol=1e-3, rtol=1e-3)


def test_torch_compile_fullgraph_with_backward():
    x, s, b, gy, ax = _case((10, 17), 0, None, True, pow2=False, seed=6)

    def f(x, s, b):
        return (fq(x, s, b, 0, Q_N, Q_P, 0.1) * gy).sum()

    args = [t.clone().requires_grad_() for t in (x, s, b)]
    torch.compile(f, fullgraph=True, backend="aot_eager")(*args).backward()
    ref = [t.clone().requires_grad_() for t in (x, s, b)]
    f(*ref).backward()
    for a, r in zip(args, ref):
        assert_bits_equal(a.grad, r.grad, "compiled grad")


def test_half_precision_inputs_are_computed_in_float32():
    x, s, _, gy, _ = _case((4, 40), None, None, False, pow2=True, seed=7)
    xb = x.bfloat16()
    y = fq(xb, s, None, None, Q_N, Q_P, 0.1)
    assert y.dtype == torch.bfloat16
    assert_bits_equal(y.float(), fq(xb.float(), s, None, None, Q_N, Q_P, 0.1).bfloat16().float())


def test_empty_and_scalar_x_and_scale_shapes():
    """Empty x: empty y, zero gradients; 0-d x per tensor; scale (C, 1) and an offset of
    another shape with one value per scale: gradients come back in each one's shape."""
    for shape, axis, c in (((0, 5), 1, 5), ((5, 0), 0, 5), ((0,), None, 1)):
        y, gx, gs, gb = _run(torch.zeros(shape), torch.ones(c) if axis is not None else
                             torch.tensor(1.0), None, torch.zeros(shape), axis, 0.1)
        assert y.shape == shape and gx.shape == shape and not bool(gs.any())
    x0 = torch.tensor(2.6)
    assert float(fq(x0, torch.tensor(0.5), None, None, Q_N, Q_P, 0.1)) == 2.5
    x, s, b, gy, _ = _case((6, 4), 0, None, True, pow2=False, seed=9)
    y, gx, gs, gb = _run(x, s.reshape(6, 1), b.reshape(1, 6), gy, 0, 0.1)
    y2, gx2, gs2, gb2 = _run(x, s, b, gy, 0, 0.1)
    assert gs.shape == (6, 1) and gb.shape == (1, 6)
    assert torch.equal(y, y2) and torch.equal(gs.reshape(-1), gs2) and torch.equal(
        gb.reshape(-1), gb2)


def test_non_contiguous_x():
    x, s, _, gy, _ = _case((20, 30), 0, None, False, pow2=False, seed=8)
    xt = x.t()  # (30, 20), channels on axis 1
    assert_bits_equal(fq(xt, s, None, 1, Q_N, Q_P, 0.1), fq(xt.contiguous(), s, None, 1, Q_N,
                                                             Q_P, 0.1).t().t())


@pytest.mark.parametrize("kw, exc, match", [
    (dict(x=torch.ones(4, dtype=torch.float64)), TypeError, "x must be float32"),
    (dict(x=torch.ones(4, dtype=torch.int32)), TypeError, "x must be"),
    (dict(scale=torch.tensor(1.0, dtype=torch.float64)), TypeError, "scale must be float32"),
    (dict(scale=torch.tensor(0.0)), ValueError, "must be finite and > 0"),
    (dict(scale=torch.tensor(-1.0)), ValueError, "must be finite and > 0"),
    (dict(scale=torch.tensor(float("inf"))), ValueError, "must be finite and > 0"),
    (dict(scale=torch.tensor(float("nan"))), ValueError, "scale must be finite and > 0"),
    (dict(scale=torch.tensor(1e-40)), ValueError, "1/scale finite, got 9.9999461e-41 at index 0"),
    (dict(scale=torch.ones(3)), ValueError, "per-tensor .* one scale"),
    (dict(scale=torch.ones(3), axis=0), ValueError, "expected x.shape\\[0\\] = 4"),
    (dict(scale=torch.ones(4), axis=2), ValueError, "axis 2 is out of range"),
    (dict(offset=torch.ones(2)), ValueError, "offset has 2 elements"),
    (dict(q_n=-1), ValueError, "q_n must be"),
    (dict(q_p=0), ValueError, "q_p must be"),
    (dict(grad_factor=float("nan")), ValueError, "grad_factor must be finite"),
])
def test_bad_input_errors(kw, exc, match):
    a = dict(x=torch.ones(4), scale=torch.tensor(1.0), offset=None, axis=None, q_n=Q_N, q_p=Q_P,
             grad_factor=0.1)
    a.update(kw)
    with pytest.raises(exc, match=match):
        fq(**a)


def test_backward_op_checks_grad_shape_and_raw_binding_checks():
    x, s, zero = torch.ones(4, 3), torch.ones(3), torch.zeros(3)
    with pytest.raises(ValueError, match="grad has shape"):
        torch.ops.qkern.lsq_fake_quantize_backward(torch.ones(3), x, s, None, 1, Q_N, Q_P, 0.1)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        _C.fake_quantize_raw(x.data_ptr(), zero.data_ptr(), 0, 4, 3, 1, Q_N, Q_P,
                             x.data_ptr())
    with pytest.raises(ValueError, match="q_p must be"):
        _C.fake_quantize_raw(x.data_ptr(), s.data_ptr(), 0, 4, 3, 1, Q_N, 0, x.data_ptr())
    with pytest.raises(ValueError, match="null pointer"):
        _C.fake_quantize_raw(0, s.data_ptr(), 0, 4, 3, 1, Q_N, Q_P, x.data_ptr())
    with pytest.raises(ValueError, match="exceeds 2\\^56"):
        _C.fake_quantize_raw(x.data_ptr(), s.data_ptr(), 0, 2**40, 3, 2**20, Q_N, Q_P,
                             x.data_ptr())
