"""QuantLinear's dispatcher-free CPU path (Kernel.plan): the same bits as the torch op, taken
only when nothing needs the op, and remade when the layer's buffers change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkern.nn import QuantLinear
from qkern.ops.cpu import NonFiniteError

LAYERS = {
    "w4_exact": dict(fmt="int4", group_size=64),
    "w4_fast": dict(fmt="int4", group_size=64, mode="fast"),
    "w4_uint_zero": dict(fmt="uint4", group_size=32, symmetric=False, mode="fast"),
    "w23_fast": dict(fmt="int3", group_size=64, mode="fast"),
    "w23_exact": dict(fmt="int2", group_size=32, symmetric=False),
    "lut4": dict(fmt="nf4", group_size=64),
    "lut4_dq": dict(fmt="nf4", group_size=64, double_quant=True),
    "fp8": dict(fmt="fp8_e4m3", group_size=None),
    "w8a16": dict(fmt="int8", group_size=None),
    "w8a8": dict(fmt="int8", group_size=None, act="int8_dynamic"),
    "binary": dict(fmt="binary", group_size=None),
    "binary_xnor": dict(fmt="binary", group_size=None, act="binary"),
    "ternary": dict(fmt="ternary", group_size=None),
}


def layer(kw: dict, n: int = 24, k: int = 128, bias: bool = True) -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_float(nn.Linear(k, n, bias=bias), **kw)


def op_path(ql: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The torch-op path of the same layer (the kernel's matmul through torch.ops.qkern)."""
    y = ql._impl.forward(ql.kernel, x, ql.packed_buffers(), ql.bias, ql.out_features,
                         ql.in_features, ql.weight_q)
    return y.to(x.dtype)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("shape", [(1, 128), (5, 128), (2, 3, 128)])
def test_same_bits_as_the_op(name, shape):
    ql = layer(LAYERS[name])
    assert ql.kernel.startswith(name.split("_uint")[0].replace("_zero", ""))
    assert ql._plan(ql.bias) is not None, "this kernel has a fast path"
    x = torch.randn(shape)
    with torch.no_grad():
        y = ql(x)
    assert y.shape == (*shape[:-1], 24)
    assert torch.equal(y, op_path(ql, x))
    assert torch.equal(ql(x), y)  # grad enabled, nothing requires grad: fast path too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_other_float_inputs(dtype):
    ql = layer(LAYERS["w4_fast"])
    x = torch.randn(3, 128).to(dtype)
    with torch.no_grad():
        y = ql(x)
    assert y.dtype == dtype and torch.equal(y, op_path(ql, x))


def test_autograd_goes_through_the_op():
    ql = layer(LAYERS["w4_exact"])
    xg = torch.randn(2, 128, requires_grad=True)
    y = ql(xg)
    assert y.grad_fn is not None  # the fast path gives no graph
    y.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    ql.bias.requires_grad_()
    with torch.no_grad():
        assert ql(xg).grad_fn is None
    assert ql(xg.detach()).grad_fn is not None  # bias needs a gradient


def test_dispatch_mode_sees_the_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    ql = layer(LAYERS["w4_fast"])
    with Log(), torch.no_grad():
        ql(torch.randn(1, 128))
    assert any("qkern.gemm_w4" in s for s in seen)


def test_compile_uses_the_op():
    ql = layer(LAYERS["w4_fast"])
    x = torch.randn(4, 128)
    with torch.no_grad():
        ref = ql(x)
        got = torch.compile(ql, backend="eager", fullgraph=True)(x)
    assert torch.equal(got, ref)


def test_plan_follows_buffer_and_bias_changes():
    ql = layer(LAYERS["w4_fast"])
    x = torch.randn(2, 128)
    with torch.no_grad():
        y0 = ql(x)
        ql.bias.add_(1.0)  # in place: same tensor, new version
        y1 = ql(x)
        assert torch.equal(y1, op_path(ql, x)) and not torch.equal(y1, y0)
        torch.manual_seed(5)
        other = QuantLinear.from_float(nn.Linear(128, 24), **LAYERS["w4_fast"])
        ql.load_state_dict(other.state_dict())  # copied in place into the same buffers
        assert torch.equal(ql(x), op_path(other, x))
        ql.w4_scales = other.w4_scales.clone() * 2  # replaced: a new tensor
        y2 = ql(x)
        assert torch.equal(y2, op_path(ql, x)) and not torch.equal(y2, op_path(other, x))


def test_errors_on_the_fast_path():
    ql = layer(LAYERS["w4_fast"])
    x = torch.randn(1, 128)
    x[0, 3] = float("nan")
    with torch.no_grad(), pytest.raises(NonFiniteError, match="NaN or Inf"):
        ql(x)
    with torch.no_grad(), pytest.raises(ValueError, match="int8-activation bound"):
        ql(torch.full((1, 128), 1e37))
    with pytest.raises(ValueError, match="last dim 128"):
        ql(torch.randn(1, 64))
    exact = layer(LAYERS["w4_exact"])  # the exact mode propagates NaN
    with torch.no_grad():
        assert torch.isnan(exact(x)).any()


def test_kernels_without_a_plan_still_run():
    ql = QuantLinear.from_float(nn.Linear(64, 8), fmt="int8", group_size=None,
                                act="int8_dynamic_tensor")
    assert ql._plan(ql.bias) is None
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(ql(x), op_path(ql, x))


@pytest.mark.parametrize("n", [0, 1, 7, 4096, 1 << 21])
def test_absmax_binding(n):
    """The bound check's max|x| (the quantizers' statistics kernel) against torch."""
    from qkern import _C

    x = torch.randn(n) * 3
    got = _C.absmax_f32_raw(x.data_ptr() if n else 0, n)
    assert got == (float(x.abs().max()) if n else 0.0)
    if n:
        for bad in (float("nan"), float("inf")):
            y = x.clone()
            y[n // 2] = bad
            assert _C.absmax_f32_raw(y.data_ptr(), n) != _C.absmax_f32_raw(y.data_ptr(), n)
    with pytest.raises(ValueError, match="null pointer"):
        _C.absmax_f32_raw(0, 4)
