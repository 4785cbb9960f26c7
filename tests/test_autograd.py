"""Gradients through quantized layers (issue 9, "Gradients"): every QuantLinear kernel gives x
(and a trainable bias) the gradient of F.linear on its dequantized weight, gradcheck where the
kernel is linear in x, torch.compile with backward, the frozen-weight errors, opcheck of the
raw matmul ops with autograd, and qkern.fake_quantize's clipped straight-through gradient."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.library import opcheck

import qkern
from qkern.nn import QuantLinear
from qkern.nn import linear as linear_module
from qkern.ops import autograd as qk_autograd
from qkern.quantization.layers import ActQuant

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit in opcheck
OPS = torch.ops.qkern

# the QuantLinear cases of /work/fp/fingerprint.py: (format, from_float kwargs, kernel)
CASES = [
    ("int4", dict(group_size=128, symmetric=False), "w4_exact"),
    ("int4", dict(group_size=32), "w4_exact"),
    ("int4", dict(group_size=64, mode="fast"), "w4_fast"),
    ("int4", dict(group_size=256), "w4_exact"),
    ("int4", dict(group_size=None), "dequant"),
    ("int3", dict(group_size=64), "w23_exact"),
    ("int2", dict(group_size=32, mode="fast"), "w23_fast"),
    ("uint3", dict(group_size=128, symmetric=False), "w23_exact"),
    ("uint2", dict(group_size=64, symmetric=False, mode="fast"), "w23_fast"),
    ("nf4", dict(group_size=64), "lut4"),
    ("nf4", dict(group_size=64, double_quant=True), "lut4_dq"),
    ("fp4_e2m1", dict(group_size=32), "lut4"),
    ("fp4_bnb", dict(group_size=128), "lut4"),
    ("fp8_e4m3", dict(group_size=None), "fp8"),
    ("fp8_e5m2", dict(group_size=64), "fp8"),
    ("binary", dict(group_size=None), "binary"),
    ("binary", dict(group_size=None, act="binary"), "binary_xnor"),
    ("ternary", dict(group_size=None), "ternary"),
    ("int8", dict(group_size=None), "w8a16"),
    ("int8", dict(group_size=None, act="int8_dynamic"), "w8a8"),
    ("int8", dict(group_size=None, act="int8_dynamic_tensor"), "w8a8_tensor"),
    ("int8", dict(group_size=None, act="int8_static", act_scale=0.05), "w8a8_static"),
    ("int5", dict(group_size=64), "dequant"),
    ("mxfp4", dict(), "lut4"),
    ("log2_4", dict(group_size=32), "lut4"),
    ("int8", dict(group_size=128), "dequant"),
    ("uint4", dict(group_size=128, symmetric=False), "w4_exact"),
    ("nf4", dict(group_size=64, mode="fast"), "lut4_fast"),
]
IDS = [f"{k}-{f}-{i}" for i, (f, _, k) in enumerate(CASES)]
# kernels whose forward quantizes x (straight-through backward: not the derivative of the
# forward, so no gradcheck for them)
STE_KERNELS = {"w4_fast", "w23_fast", "lut4_fast", "binary_xnor", "w8a8", "w8a8_tensor",
               "w8a8_static"}
# the cases on a fused kernel (a raw qkern matmul op; "dequant" runs F.linear)
RAW = [c for c in CASES if c[2] != "dequant"]
RAW_IDS = [i for i, c in zip(IDS, CASES) if c[2] != "dequant"]
OPCHECKED = {}
for _fmt, _kw, _kernel in RAW:
    OPCHECKED.setdefault(_kernel, (_fmt, _kw))


@pytest.fixture(autouse=True)
def _private_fallback_warnings(monkeypatch):
    """The dequant layers built here do not use up QuantLinear's once-per-reason fallback
    warnings that later tests expect to see."""
    monkeypatch.setattr(linear_module, "_WARNED", set(linear_module._WARNED))


def _layer(fmt, kw, kernel, n=64, k=256, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KernelFallbackWarning of the dequant cases
        q = QuantLinear.from_float(lin, fmt, **kw)
    assert q.kernel == kernel
    return q


def _reference(q, x, grad_y, bias_grad):
    """x.grad (and bias.grad) of F.linear on the layer's dequantized weight, by torch."""
    xr = x.detach().clone().requires_grad_()
    b = None if q.bias is None else q.bias.detach().clone().requires_grad_(bias_grad)
    F.linear(xr, q.dequantize_weight(), b).backward(grad_y)
    return xr.grad, (b.grad if bias_grad else None)


@pytest.mark.parametrize("fmt,kw,kernel", CASES, ids=IDS)
def test_quantlinear_grad_matches_flinear(fmt, kw, kernel):
    q = _layer(fmt, kw, kernel)
    q.bias.requires_grad_(True)
    x = (torch.randn(2, 3, 256) * 2).requires_grad_()
    y = q(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    ref_x, ref_b = _reference(q, x, grad_y, True)
    assert x.grad is not None and q.bias.grad is not None
    torch.testing.assert_close(x.grad, ref_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.bias.grad, ref_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,kw,kernel", RAW, ids=RAW_IDS)
def test_chunked_backward_ragged_rows(fmt, kw, kernel, monkeypatch):
    """N = 20 (not a multiple of the 8- or 16-row tiles) decoded in several row blocks."""
    monkeypatch.setattr(qk_autograd, "CHUNK_ELEMENTS", 8 * 256)
    q = _layer(fmt, kw, kernel, n=20)
    x = torch.randn(5, 256).requires_grad_()
    grad_y = torch.randn(5, 20)
    q(x).backward(grad_y)
    assert q.bias.grad is None  # the bias stays frozen by default
    torch.testing.assert_close(x.grad, _reference(q, x, grad_y, False)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,kw,kernel", [c for c in CASES if c[2] not in STE_KERNELS],
                         ids=[i for i, c in zip(IDS, CASES) if c[2] not in STE_KERNELS])
def test_gradcheck_linear_kernels(fmt, kw, kernel):
    """torch.autograd.gradcheck with float64 inputs. The kernels compute in float32, so the
    step is large (eps=0.5: exact for a map linear in x, which these kernels are) and the
    tolerance is float32's."""
    q = _layer(fmt, kw, kernel, n=8, k=256)
    x = torch.randn(1, 256).double().requires_grad_()
    assert torch.autograd.gradcheck(q, (x,), eps=0.5, atol=2e-4, rtol=1e-3)


def test_grad_keeps_input_dtype():
    q = _layer("int4", dict(group_size=32), "w4_exact")
    x = torch.randn(4, 256, dtype=torch.bfloat16, requires_grad=True)
    q(x).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    ref = _reference(q, x.float(), torch.ones(4, 64), False)[0]
    torch.testing.assert_close(x.grad.float(), ref, rtol=1e-2, atol=1e-2)


def test_torch_compile_fullgraph_backward():
    torch.manual_seed(3)
    specs = [("int4", dict(group_size=64), "w4_exact"),
             ("int8", dict(group_size=None, act="int8_static", act_scale=0.05), "w8a8_static"),
             ("nf4", dict(group_size=64, double_quant=True), "lut4_dq"),
             ("int3", dict(group_size=64), "w23_exact"),
             ("int8", dict(group_size=None, act="int8_dynamic_tensor"), "w8a8_tensor")]
    layers = [_layer(f, kw, kern, n=256, k=256, seed=i) for i, (f, kw, kern) in enumerate(specs)]
    model = nn.Sequential(*layers)
    layers[0].bias.requires_grad_(True)
    x = torch.randn(3, 256)

    def run(m):
        xi = x.clone().requires_grad_()
        m(xi).square().sum().backward()
        g = (xi.grad, layers[0].bias.grad.clone())
        layers[0].bias.grad = None
        return g

    eager = run(model)
    compiled = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])


@pytest.mark.parametrize("fmt,kw,kernel", CASES, ids=IDS)
def test_frozen_weight_buffers_raise(fmt, kw, kernel):
    q = _layer(fmt, kw, kernel, n=16)
    floats = [n for n, t in q.packed_buffers().items() if t.is_floating_point()]
    assert floats
    getattr(q, floats[0]).requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        q(torch.randn(2, 256, requires_grad=True))
    with torch.no_grad():  # inference is unaffected
        q(torch.randn(2, 256))


def _raw_args(q, x):
    """(op, args) of the layer's raw matmul op, from its packed buffers."""
    b, n, k, wq = q.packed_buffers(), q.out_features, q.in_features, q.weight_q
    bias = q.bias
    kern = q.kernel
    if kern.startswith("w4"):
        return "gemm_w4", (x, b["w4_packed"], b["w4_scales"], b.get("w4_zeros"), bias, n, k,
                           wq.group_size, int(kern == "w4_fast"))
    if kern.startswith("w23"):
        return "gemm_w23", (x, b["w23_packed"], b["w23_scales"], b.get("w23_zeros"), bias, n, k,
                            wq.group_size, wq.format.bits, wq.format.qmin,
                            int(kern == "w23_fast"))
    if kern == "lut4":
        return "gemm_lut4", (x, b["lut4_packed"], b["lut4_scales"], b["lut4_table"], bias, n, k,
                             wq.group_size)
    if kern == "lut4_fast":
        return "gemm_lut4_fast", (x, b["lut4f_packed"], b["lut4f_scales"], b["lut4f_table8"],
                                  bias, n, k, wq.group_size)
    if kern == "lut4_dq":
        return "gemm_lut4_dq", (x, b["lut4_packed"], b["lut4_qscales"], b["lut4_scale2"],
                                b["lut4_mean"], b["lut4_table"], bias, n, k, wq.group_size,
                                wq.double_quant.group)
    if kern == "fp8":
        return "gemm_fp8", (x, b["fp8_w"], b["fp8_scales"], bias, n, k, wq.group_size or 0,
                            0 if wq.format.name == "fp8_e4m3" else 1)
    if kern.startswith("binary"):
        return "gemm_binary", (x, b["bits_w"], b["bits_alpha"], bias, n, k,
                               kern == "binary_xnor")
    if kern == "ternary":
        return "gemm_ternary", (x, b["bits_w"], b["bits_alpha"], bias, n, k)
    if kern in ("w8a16", "w8a8"):
        return f"gemm_{kern}", (x, b["w8_packed"], b["w8_scale"], bias, n, k)
    y = torch.randn(*x.shape[:-1], n)
    return "ste_w8", (y, x, b["w8_packed"], b["w8_scale"], n, k)



@pytest.mark.parametrize("fmt,kw,kernel", RAW, ids=RAW_IDS)
def test_raw_op_grad_and_opcheck(fmt, kw, kernel):
    """The raw torch.ops.qkern matmul: x.grad = grad_y @ W, bias.grad = grad_y summed; opcheck
    with inputs requiring grad (autograd registration, AOT dispatch with backward), once per
    kernel."""
    q = _layer(fmt, kw, kernel, n=24)
    q.bias.requires_grad_(True)
    x = torch.randn(3, 256, requires_grad=True)
    op, args = _raw_args(q, x)
    y = getattr(OPS, op)(*args)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    ref_x, ref_b = _reference(q, x, grad_y, True)
    torch.testing.assert_close(x.grad, ref_x, rtol=1e-5, atol=1e-5)
    if op != "ste_w8":
        torch.testing.assert_close(q.bias.grad, ref_b, rtol=1e-5, atol=1e-5)
    else:  # y's own gradient passes through unchanged
        yy = args[0].clone().requires_grad_()
        OPS.ste_w8(yy, *args[1:]).backward(grad_y)
        torch.testing.assert_close(yy.grad, grad_y)
    if kernel in OPCHECKED and (fmt, kw) == OPCHECKED[kernel]:  # one layer per kernel (slow)
        opcheck(getattr(OPS, op).default, args)


@pytest.mark.parametrize("fmt,kw,kernel", RAW, ids=RAW_IDS)
def test_raw_op_frozen_weight_error(fmt, kw, kernel):
    q = _layer(fmt, kw, kernel, n=16)
    op, args = _raw_args(q, torch.randn(2, 256, requires_grad=True))
    args = list(args)
    names = [a.name for a in getattr(OPS, op).default._schema.arguments]
    i = names.index(qk_autograd.FROZEN[op][0])
    args[i] = args[i].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="quantized weight is frozen"):
        getattr(OPS, op)(*args)


def test_ste_w8_checks_arguments():
    q = _layer("int8", dict(group_size=None, act="int8_dynamic_tensor"), "w8a8_tensor", n=16)
    b = q.packed_buffers()
    with pytest.raises(ValueError, match="y must be"):
        OPS.ste_w8(torch.zeros(2, 15), torch.zeros(2, 256), b["w8_packed"], b["w8_scale"], 16, 256)
    with pytest.raises(ValueError, match="packed_w"):
        OPS.ste_w8(torch.zeros(2, 16), torch.zeros(2, 256), b["w8_packed"][1:], b["w8_scale"],
                   16, 256)


# ---------------------------------------------------------------- quantize / fake_quantize

def test_quantize_of_grad_tensor_warns_and_detaches():
    w = torch.randn(16, 64, requires_grad=True)
    with pytest.warns(qkern.QuantizeGradientWarning, match="fake_quantize"):
        q = qkern.quantize(w, "int8")
    assert not q.scale.requires_grad and not q.dequantize().requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            qkern.quantize(w, "int8")
        qkern.quantize(w.detach(), "int8")


def _ste_reference(x, lo_unit, hi_unit, scale, zp=0.0):
    """Hand-computed mask: within half a step of the end codes, per element's scale."""
    lo, hi = (lo_unit - zp) * scale, (hi_unit - zp) * scale
    return ((x >= lo) & (x <= hi)).float()


def test_fake_quantize_int_symmetric_given_scale():
    x = torch.tensor([-9.0, -7.6, -7.4, -1.0, 0.0, 2.2, 7.4, 7.6, 100.0], requires_grad=True)
    y = qkern.fake_quantize(x, "int4", scale=1.0)
    torch.testing.assert_close(y, qkern.quantize(x.detach(), "int4", scale=1.0).dequantize())
    y.backward(torch.arange(1.0, 10.0))
    # int4: codes -8..7, so x in [-8.5, 7.5] passes the gradient
    mask = torch.tensor([0, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    torch.testing.assert_close(x.grad, mask * torch.arange(1.0, 10.0))


def test_fake_quantize_asymmetric_per_group():
    torch.manual_seed(0)
    x = (torch.randn(4, 64) * 3).requires_grad_()
    scale = torch.rand(4, 2) * 0.1 + 0.05
    zp = torch.randint(-3, 4, (4, 2))
    kw = dict(granularity="group", axis=1, group_size=32, symmetric=False, scale=scale,
              zero_point=zp)
    y = qkern.fake_quantize(x, "int4", **kw)
    torch.testing.assert_close(y, qkern.quantize(x.detach(), "int4", **kw).dequantize())
    y.sum().backward()
    s = scale.repeat_interleave(32, dim=1)
    z = zp.repeat_interleave(32, dim=1).float()
    ref = _ste_reference(x.detach(), -8.5, 7.5, s, z)
    assert 0 < ref.sum() < ref.numel()  # some clamped, some not
    torch.testing.assert_close(x.grad, ref)


def test_fake_quantize_codebook_and_clip():
    torch.manual_seed(1)
    x = (torch.randn(8, 32) * 4).requires_grad_()
    y = qkern.fake_quantize(x, "fp4_e2m1", granularity="group", group_size=32,
                            scale=torch.full((8, 1), 0.5),
                            clip=(-2.0, 2.5))
    y.sum().backward()
    # fp4_e2m1 values up to 6 (the gap below 6 is 2): range [-7, 7] * 0.5; and the clip range
    xd = x.detach()
    ref = _ste_reference(xd, -7.0, 7.0, 0.5) * ((xd >= -2.0) & (xd <= 2.5)).float()
    torch.testing.assert_close(x.grad, ref)


def test_fake_quantize_dynamic_scale_passes_every_unclamped_element():
    torch.manual_seed(2)
    x = torch.randn(8, 64, requires_grad=True)
    qkern.fake_quantize(x, "int8", granularity="channel", axis=0).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # absmax scales clamp nothing
    x.grad = None
    qkern.fake_quantize(x, "int8", granularity="channel", axis=0, clip_ratio=0.5).sum().backward()
    amax = x.detach().abs().amax(dim=1, keepdim=True)
    ref = (x.detach().abs() <= amax * 0.5 / 127 * 127.5).float()
    torch.testing.assert_close(x.grad, ref)


def test_fake_quantize_no_grad_is_plain_dequantize():
    x = torch.randn(4, 32)
    y = qkern.fake_quantize(x, "nf4", group_size=32)
    assert not y.requires_grad
    torch.testing.assert_close(y, qkern.quantize(x, "nf4", group_size=32).dequantize())


def test_fake_quantize_compiles():
    x = torch.randn(4, 32, requires_grad=True)

    def f(t):
        return qkern.fake_quantize(t, "int4", scale=0.05).sum()

    f(x).backward()
    eager = x.grad.clone()
    x.grad = None
    torch.compile(f, backend="aot_eager")(x).backward()
    torch.testing.assert_close(x.grad, eager)


def test_static_activation_quantizer_passes_ste_gradient():
    """quantization.layers.ActQuant (StaticConfig's activation quantizer) trains through with
    the clipped STE instead of cutting the graph."""
    torch.manual_seed(4)
    lin = nn.Linear(16, 4)
    act = ActQuant(lin, "int8", torch.tensor(0.01), None)
    x = (torch.randn(3, 16) * 0.8).requires_grad_()
    y = act(x)
    torch.testing.assert_close(y, lin(qkern.quantize(x.detach(), "int8", scale=0.01)
                                      .dequantize()))
    y.sum().backward()
    xd = x.detach()  # int8 codes -128..127 at scale 0.01: [-1.285, 1.275] passes
    mask = ((xd >= -0.01 * 128.5) & (xd <= 0.01 * 127.5)).float()
    assert 0 < mask.sum() < mask.numel()
    torch.testing.assert_close(x.grad, mask * lin.weight.sum(0))


def test_every_matmul_op_has_autograd():
    """A new matmul op needs its weight decoder in ops/autograd.py (the integer-only core and
    the packer have no gradient)."""
    from_schemas = set(qkern.ops.schemas.MATMUL_SCHEMAS) - {"pack_w8", "gemm_s8s8_s32"}
    assert from_schemas == set(qk_autograd.FROZEN)


def test_quant_conv2d_input_grad():
    """QuantConv2d runs its QuantLinear on the unfolded input: the gradient reaches x."""
    torch.manual_seed(5)
    conv = nn.Conv2d(16, 12, 2, padding=1)
    qc = qkern.nn.QuantConv2d.from_float(conv, "int4", group_size=32)
    assert qc.qlinear.kernel == "w4_exact"
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    y = qc(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    w = qc.qlinear.dequantize_weight().reshape(12, 16, 2, 2)
    xr = x.detach().clone().requires_grad_()
    F.conv2d(xr, w, qc.qlinear.bias, padding=1).backward(grad_y)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
