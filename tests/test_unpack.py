"""QuantLinear.quantized_weight(): the QTensor read back from every kernel's packed buffers
equals the one qkern.quantize gave before packing (codes, scales, zero points), after
save/load too; its dequantization is the weight the layer computes with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qkern
from qkern.nn import QuantLinear

CASES = [  # (format, group_size, symmetric, extra quantize kwargs, expected kernel prefix)
    ("int4", 32, True, {}, "w4"),
    ("int4", 64, False, {}, "w4"),
    ("uint4", 128, False, {}, "w4"),
    ("int3", 64, False, {}, "w23"),
    ("uint3", 32, False, {}, "w23"),
    ("int2", 64, True, {}, "w23"),
    ("uint2", 64, False, {}, "w23"),
    ("int8", None, True, {}, "w8"),
    ("nf4", 64, True, {}, "lut4"),
    ("nf4", 64, True, {"double_quant": True}, "lut4_dq"),
    ("fp4_e2m1", 32, True, {}, "lut4"),
    ("fp8_e4m3", None, True, {}, "fp8"),
    ("fp8_e5m2", 128, True, {}, "fp8"),
    ("int5", 16, False, {}, "dequant"),
    ("int6", None, True, {}, "dequant"),
]


def _layer(fmt, group, sym, kw, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(256, 40, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 256, generator=g) * 0.05)
    return lin, QuantLinear.from_float(lin, fmt, group_size=group, symmetric=sym, **kw)


def _expected(lin, fmt, group, sym, kw):
    w = lin.weight.detach().float()
    if group is None:
        return qkern.quantize(w, fmt, granularity="channel", axis=0, symmetric=sym, **kw)
    return qkern.quantize(w, fmt, granularity="group", axis=1, group_size=group, symmetric=sym,
                          **kw)


def _same(got, want):
    assert got.format.name == want.format.name and got.layout == want.layout
    assert torch.equal(got.codes.view(torch.uint8), want.codes.view(torch.uint8))
    assert torch.equal(got.scale.reshape(want.scale.shape), want.scale.float())
    if want.zero_point is None:
        assert got.zero_point is None
    else:
        assert torch.equal(got.zero_point.reshape(want.zero_point.shape), want.zero_point)
    if want.double_quant is not None:
        assert torch.equal(got.double_quant.codes.reshape(-1), want.double_quant.codes.reshape(-1))


@pytest.mark.parametrize("fmt,group,sym,kw,kernel", CASES,
                         ids=[f"{c[0]}-g{c[1]}-{'sym' if c[2] else 'asym'}-{c[4]}" for c in CASES])
def test_codes_come_back_from_the_buffers(fmt, group, sym, kw, kernel, tmp_path):
    lin, ql = _layer(fmt, group, sym, kw)
    assert ql.kernel.startswith(kernel)
    want = _expected(lin, fmt, group, sym, kw)
    got = ql.quantized_weight()
    if want.double_quant is None:
        _same(got, want)
    else:  # double-quantized: the block scales are rebuilt from their int8 codes
        assert torch.equal(got.codes, want.codes)
        torch.testing.assert_close(got.dequantize(), want.dequantize(), rtol=0, atol=0)
    torch.testing.assert_close(got.dequantize(), ql.dequantize_weight(), rtol=0, atol=0)
    # after save / load: the buffers (not the placeholder weight_q) give the codes
    path = tmp_path / "m.qk"
    qkern.save(nn.Sequential(ql), path)
    other = nn.Sequential(nn.Linear(256, 40))
    loaded = qkern.load(path, other)[0]
    torch.testing.assert_close(loaded.quantized_weight().dequantize(), got.dequantize(),
                               rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["uint4", "uint3", "uint5"])
def test_float_zero_points_come_back(fmt):
    from dataclasses import replace
    lin, _ = _layer(fmt, 64, False, {})
    q = _expected(lin, fmt, 64, False, {})
    q = replace(q, zero_point=q.zero_point.float() + 0.25)  # HQQ-style float zero points
    ql = QuantLinear(q, lin.bias)
    got = ql.quantized_weight()
    assert torch.equal(got.codes, q.codes) and torch.equal(got.zero_point, q.zero_point)
    torch.testing.assert_close(got.dequantize(), q.dequantize(), rtol=0, atol=0)


def test_int8_token_wraps_the_inner_kernel():
    lin, _ = _layer("int4", 64, False, {})
    ql = QuantLinear.from_float(lin, "int4", group_size=64, symmetric=False, act="int8_token")
    _same(ql.quantized_weight(), _expected(lin, "int4", 64, False, {}))


def test_binary_weights_say_they_cannot():
    lin = nn.Linear(64, 8)
    ql = QuantLinear.from_float(lin, "binary", group_size=None)
    with pytest.raises(NotImplementedError, match="cannot give its codes back"):
        ql.quantized_weight()
