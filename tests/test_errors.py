"""Every documented bad input raises a clean ValueError/TypeError naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qkern

BAD = (ValueError, TypeError)


def x34():
    return torch.randn(3, 4)


def test_unknown_format():
    with pytest.raises(ValueError, match="int9"):
        qkern.formats.get("int9")
    with pytest.raises(ValueError, match="nope"):
        qkern.quantize(x34(), "nope")


@pytest.mark.parametrize("bits", [0, 9, -1, 16])
def test_pack_bits_out_of_range(bits):
    c = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bits"):
        qkern.pack_bits(c, bits)
    with pytest.raises(ValueError, match="bits"):
        qkern.unpack_bits(c, bits, 4)


def test_group_size_must_divide_axis():
    with pytest.raises(ValueError, match=r"(?i)group"):
        qkern.quantize(torch.randn(4, 10), "int4", granularity="group", group_size=4)
    with pytest.raises(ValueError, match=r"(?i)group"):
        qkern.quantize(torch.randn(4, 8), "int4", granularity="group", group_size=0)
    with pytest.raises(ValueError, match=r"(?i)group|block|64"):
        qkern.quantize(torch.randn(4, 48), "nf4")  # default block 64 does not divide 48


@pytest.mark.parametrize("gran,axis", [("channel", 2), ("channel", -3), ("group", 5),
                                       ("group", -3)])
def test_axis_out_of_range(gran, axis):
    with pytest.raises(ValueError, match=r"(?i)axis"):
        qkern.quantize(x34(), "int8", granularity=gran, axis=axis, group_size=1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.int64,
                                   torch.complex64, torch.bool])
def test_integer_or_complex_input(dtype):
    x = torch.zeros(4, 4, dtype=dtype)
    with pytest.raises(BAD, match=r"(?i)dtype|float|complex|int"):
        qkern.quantize(x, "int8")


@pytest.mark.parametrize("name", ["int4", "nf4", "fp8_e4m3", "mxfp4", "uint8", "mulaw"])
def test_nan_inf_reported_with_count_and_first_index(name):
    x = torch.randn(2, 64)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    with pytest.raises(ValueError, match=r"2 NaN/Inf.*first at.*5"):
        qkern.quantize(x, name)
    x = torch.randn(2, 64)
    x[1, 3] = -float("inf")
    with pytest.raises(ValueError, match=r"1 NaN/Inf.*first at"):
        qkern.quantize(x, name, granularity="tensor", scale=1.0)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match=r"(?i)scale"):
        qkern.quantize(x34(), "int8", granularity="tensor", scale=scale)
    s = torch.ones(3)
    s[1] = scale
    with pytest.raises(ValueError, match=r"(?i)scale"):
        qkern.quantize(x34(), "int8", granularity="channel", scale=s)
    with pytest.raises(ValueError, match=r"(?i)scale"):
        qkern.quantize(x34(), "fp8_e4m3", granularity="channel", scale=s)


def test_scale_wrong_shape():
    with pytest.raises(BAD, match=r"(?i)scale|shape"):
        qkern.quantize(x34(), "int8", granularity="channel", scale=torch.ones(4))


@pytest.mark.parametrize("zp", [-1, 16, 1000])
def test_zero_point_outside_code_range(zp):
    with pytest.raises(ValueError, match=r"(?i)zero"):
        qkern.quantize(x34(), "uint4", granularity="tensor", symmetric=False, scale=0.1,
                       zero_point=zp)
    z = torch.zeros(3, dtype=torch.int32)
    z[2] = zp
    with pytest.raises(ValueError, match=r"(?i)zero"):
        qkern.quantize(x34(), "uint4", granularity="channel", symmetric=False,
                       scale=torch.full((3,), 0.1), zero_point=z)


def test_short_packed_buffer():
    with pytest.raises(ValueError):
        qkern.unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 7)
    with pytest.raises(ValueError):
        qkern.unpack_bits(np.zeros(0, np.uint8), 1, 1)
    with pytest.raises(ValueError):
        qkern.unpack_int32(torch.zeros(1, 4, dtype=torch.int32), 4, 9, 0)


@pytest.mark.parametrize("kw,word", [({"rounding": "banker"}, "banker"),
                                     ({"quantizer": "midway"}, "midway"),
                                     ({"granularity": "row"}, "row")])
def test_unknown_options(kw, word):
    with pytest.raises(ValueError, match=word):
        qkern.quantize(x34(), "int8", **kw)


@pytest.mark.parametrize("quantizer", ["midrise", "deadzone"])
def test_midrise_deadzone_need_symmetric(quantizer):
    with pytest.raises(ValueError, match=r"(?i)symmetric|midrise|deadzone|dead"):
        qkern.quantize(x34(), "int8", quantizer=quantizer, symmetric=False)


def test_deadzone_width_below_one():
    with pytest.raises(ValueError, match=r"(?i)dead"):
        qkern.quantize(x34(), "int8", quantizer="deadzone", deadzone=0.5)


@pytest.mark.parametrize("name", ["int8", "nf4", "fp8_e5m2", "mxint8", "mulaw", "binary"])
@pytest.mark.parametrize("shape", [(0,), (0, 64), (3, 0)])
def test_empty_tensors(name, shape):
    x = torch.empty(shape)
    qt = qkern.quantize(x, name, granularity="tensor")
    assert tuple(qt.codes.shape) == shape
    assert tuple(qt.dequantize().shape) == shape
    packed = qt.pack()
    assert getattr(packed, "data", packed).numel() == 0


def test_empty_with_default_granularity():
    for name in ["int8", "nf4", "mxfp4"]:
        qt = qkern.quantize(torch.empty(0, 64), name)
        assert tuple(qt.dequantize().shape) == (0, 64)


def test_codec_wrong_dtype():
    with pytest.raises(BAD):
        qkern.companding.mulaw_encode(torch.zeros(4, dtype=torch.float32))
    with pytest.raises(BAD):
        qkern.companding.alaw_decode(torch.zeros(4, dtype=torch.int16))


def test_set_isa_and_threads_validate():
    with pytest.raises(ValueError):
        qkern.set_isa("neon")
    with pytest.raises(ValueError):
        qkern.set_num_threads(0)
