"""Issue 9, silent coercions: each is now a TypeError / ValueError naming the problem (the
values the old code produced are noted; the valid neighbours still work, checked against
independent references)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkern
from qkern.nn import QuantLinear


def test_quantlinear_integer_input_is_a_type_error():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    q = QuantLinear.from_float(lin, "int8", group_size=None)
    with pytest.raises(TypeError, match="floating-point input"):
        q(torch.ones(2, 64, dtype=torch.int64))  # returned a truncated int64 result
    with pytest.raises(TypeError, match="floating-point input"):
        q(torch.ones(2, 64, dtype=torch.int32))
    x = torch.ones(2, 64)
    ref = F.linear(x.double(), q.dequantize_weight().double(), lin.bias.double())
    assert torch.allclose(q(x).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zp", [1.7, [0.5], float("nan"), float("inf")])
def test_fractional_zero_point_is_a_value_error(zp):
    x = torch.linspace(-1, 3, 16)
    with pytest.raises(ValueError, match="zero_point must be integer-valued"):
        qkern.quantize(x, "uint8", symmetric=False, scale=0.02, zero_point=zp)


def test_integral_float_zero_point_still_accepted():
    x = torch.linspace(-1, 3, 16)
    q = qkern.quantize(x, "uint8", symmetric=False, scale=0.02, zero_point=50.0)
    ref = np.clip(np.rint(x.numpy() * np.float32(1 / np.float32(0.02))) + 50, 0, 255)
    np.testing.assert_array_equal(q.codes.numpy(), ref.astype(np.uint8))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, "float32"])
def test_dequantize_non_float_dtype_is_a_type_error(dtype):
    q = qkern.quantize(torch.randn(32), "int8")
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        qkern.dequantize(q, dtype=dtype)  # int32 returned integers
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        q.dequantize(dtype)


def test_dequantize_float_dtypes_still_work():
    x = torch.randn(32)
    q = qkern.quantize(x, "int8")
    ref = q.codes.double() * q.scale.double()
    for dt in (torch.float64, torch.float16, torch.bfloat16):
        assert torch.equal(qkern.dequantize(q, dtype=dt), ref.float().to(dt))


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8_e4m3", "mxint8", "int8"])
def test_double_quant_rejected_outside_float_scaled_codebooks(fmt):
    with pytest.raises(ValueError, match="double_quant"):
        qkern.quantize(torch.randn(4, 64), fmt, double_quant=True)


def test_double_quant_nf4_still_works():
    q = qkern.quantize(torch.randn(4, 64), "nf4", double_quant=True)
    assert q.double_quant is not None


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64])
def test_unpack_bits_wide_buffer_is_a_type_error(dtype):
    packed = torch.tensor([0x1234, 0x00FF], dtype=dtype)
    with pytest.raises(TypeError, match="byte buffer"):
        qkern.unpack_bits(packed, 4, 2)  # kept the low byte 0x34 silently
    with pytest.raises(TypeError, match="byte buffer"):
        qkern.unpack_bits(packed.numpy(), 4, 2)


def test_unpack_bits_bytes_still_work():
    out = qkern.unpack_bits(torch.tensor([0x34], dtype=torch.uint8), 4, 2)
    assert out.tolist() == [4, 3]
