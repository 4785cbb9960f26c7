"""Issue 9, silent wrong results: the int8-activation matmuls (W8A8 per token, per tensor,
static; int4 / int2 / int3 fast mode) returned +-Inf for activations near 1e37 where F.linear on
the dequantized weight is finite. Past the documented bound (max|x| * length <= 2^120,
docs/numerics.md "Overflow bound") they raise; just inside it the result is finite and within
the documented error of F.linear in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkern
from qkern.nn import QuantLinear
from qkern.ops import w4 as ops_w4
from qkern.ops import w8 as ops_w8
from qkern.ops import w23 as ops_w23

BOUND = 2.0**120


def _w8(N=8, K=64):
    codes = torch.full((N, K), 127, dtype=torch.int8)
    sw = torch.full((N,), 1e-10)
    return codes, ops_w8.pack_w8(codes), sw


def _ref(x, w):  # F.linear on the dequantized weight, float64
    return F.linear(x.double(), w.double())


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_w8a8_per_token_huge_x(isa):
    qkern.set_isa(isa)
    codes, packed, sw = _w8()
    x = torch.full((2, 64), 1e37)
    assert torch.isfinite(_ref(x, codes.float() * sw[:, None]).float()).all()  # F.linear: finite
    with pytest.raises(ValueError, match="2\\^120"):
        torch.ops.qkern.gemm_w8a8(x, packed, sw, None, 8, 64)
    x = torch.full((2, 64), BOUND / 64)  # at the bound: finite, the definition's value
    y = torch.ops.qkern.gemm_w8a8(x, packed, sw, None, 8, 64)
    ref = _ref(x, codes.float() * sw[:, None])
    assert torch.isfinite(y).all()
    assert torch.allclose(y.double(), ref, rtol=1e-5)


@pytest.mark.parametrize("act", ["int8_dynamic", "int8_dynamic_tensor", "int8_static"])
def test_quantlinear_w8a8_huge_x(act):
    torch.manual_seed(0)
    lin = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        lin.weight.mul_(1e-10)
    kw = {"act_scale": 1e37 / 127} if act == "int8_static" else {}
    q = QuantLinear.from_float(lin, "int8", group_size=None, act=act, **kw)
    x = torch.full((3, 64), 1e37)
    assert torch.isfinite(_ref(x, q.dequantize_weight()).float()).all()
    with pytest.raises(ValueError, match="2\\^120"):
        q(x)
    if act != "int8_static":
        x = torch.full((3, 64), BOUND / 64)
        y = q(x)
        assert torch.isfinite(y).all()
        assert torch.allclose(y.double(), _ref(x, q.dequantize_weight()), rtol=1e-2)


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_w4_fast_huge_x(isa):
    qkern.set_isa(isa)
    N, K, G = 8, 64, 32
    codes = torch.full((N, K), 7, dtype=torch.int8)
    scales = torch.full((N, K // G), 1e-10)
    w = ops_w4.pack_weight(codes, scales, None, G)
    wd = codes.float() * 1e-10
    x = torch.full((2, K), 1e37)
    assert torch.isfinite(_ref(x, wd).float()).all()
    with pytest.raises(ValueError, match="2\\^120"):
        ops_w4.gemm_w4(x, w, mode="fast")
    x = torch.full((2, K), BOUND / G)
    y = ops_w4.gemm_w4(x, w, mode="fast")
    assert torch.isfinite(y).all() and torch.allclose(y.double(), _ref(x, wd), rtol=1e-2)


def test_w23_fast_huge_x():
    N, K, G = 8, 64, 32
    codes = torch.full((N, K), 1, dtype=torch.int8)
    scales = torch.full((N, K // G), 1e-10)
    w = ops_w23.pack_weight(codes, scales, None, G, bits=2)
    x = torch.full((2, K), 1e37)
    with pytest.raises(ValueError, match="2\\^120"):
        ops_w23.gemm_w23(x, w, mode="fast")
    x = torch.full((2, K), BOUND / G)
    y = ops_w23.gemm_w23(x, w, mode="fast")
    assert torch.isfinite(y).all()
    assert torch.allclose(y.double(), _ref(x, codes.float() * 1e-10), rtol=1e-2)
