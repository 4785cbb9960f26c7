"""Issue 9: the raw torch.ops.qkern element-wise ops check their arguments themselves (checks
in qkern/ops/checks.py, before any dtype conversion): bad scales, NaN dead zone, bad sign_bit,
qmin == qmax, out-of-range zero points and force-casts are TypeError / ValueError; valid calls
still match an independent numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

OPS = torch.ops.qkern
X = torch.linspace(-2, 2, 8)
ONE = torch.ones(1)
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_CODES = torch.arange(8, dtype=torch.uint8)


def qa(x=X, scale=ONE, zp=None, qmin=-8, qmax=7, shape=0, dz=0.0, g=8):
    return OPS.quantize_affine(x, scale, zp, g, qmin, qmax, 0, shape, dz, 0)


BAD_SCALES = [0.0, -1.0, float("nan"), float("inf"), 1e-45]


@pytest.mark.parametrize("s", BAD_SCALES)
def test_quantize_affine_bad_scale(s):
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        qa(scale=torch.tensor([s]))


@pytest.mark.parametrize("s", BAD_SCALES[:4])
def test_dequantize_affine_bad_scale(s):
    codes = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        OPS.dequantize_affine(codes, torch.tensor([s]), None, 8, True, 0.0)


@pytest.mark.parametrize("s", BAD_SCALES)
def test_quantize_codebook_bad_scale(s):
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        OPS.quantize_codebook(X, torch.tensor([s]), E2M1, E2M1_CODES, 8, 8, 0, 0)


@pytest.mark.parametrize("dz", [float("nan"), float("inf"), -0.5])
def test_nan_deadzone(dz):
    with pytest.raises(ValueError, match="deadzone_half"):
        qa(shape=2, dz=dz)
    with pytest.raises(ValueError, match="deadzone_half"):
        OPS.quantize_affine_dynamic(X, 8, -8, 7, 0, 7.0, 0, 0, 2, dz, 0)


@pytest.mark.parametrize("sign_bit", [3, 256, -8, 1 << 40, 4])
def test_bad_sign_bit(sign_bit):
    # 3, 256, -8, 2**40: not one bit of a byte; 4: set in the magnitude codes 4..7
    with pytest.raises(ValueError, match="sign_bit"):
        OPS.quantize_codebook(X, ONE, E2M1, E2M1_CODES, sign_bit, 8, 0, 0)
    with pytest.raises(ValueError, match="sign_bit"):
        OPS.quantize_codebook_dynamic(X, E2M1, E2M1_CODES, sign_bit, 8, 0, 6.0, 0, 0, 0)


def test_qmin_equals_qmax():
    with pytest.raises(ValueError, match="qmin < qmax"):
        qa(qmin=3, qmax=3)
    with pytest.raises(ValueError, match="qmin < qmax"):
        OPS.quantize_affine_dynamic(X, 8, 0, 0, 1, 1.0, 0, 0, 0, 0.0, 0)


@pytest.mark.parametrize("zp", [2**40, 2**32, -(2**40)])
def test_huge_zero_point(zp):  # 2**40 became 0 in the int32 conversion
    with pytest.raises(ValueError, match="zero_point must lie in the code range"):
        qa(zp=torch.tensor([zp], dtype=torch.int64), qmin=0, qmax=15)
    with pytest.raises(ValueError, match="zero_point must lie in the code range"):
        OPS.dequantize_affine(torch.zeros(8, dtype=torch.uint8), ONE,
                              torch.tensor([zp], dtype=torch.int64), 8, False, 0.0)


def test_float_zero_point_is_a_type_error():
    with pytest.raises(TypeError, match="zero_point"):
        qa(zp=torch.tensor([1.7]), qmin=0, qmax=15)


@pytest.mark.parametrize("op,dtype", [("mulaw_encode", torch.float32),
                                      ("alaw_encode", torch.int64),
                                      ("mulaw_decode", torch.int64),
                                      ("alaw_decode", torch.float32)])
def test_g711_force_casts(op, dtype):
    with pytest.raises(TypeError, match="must be"):
        getattr(OPS, op)(torch.tensor([1.5, 300.0]).to(dtype))


def test_integer_inputs_are_type_errors():
    with pytest.raises(TypeError, match="x must be a floating-point"):
        qa(x=torch.arange(8))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        OPS.quantize_affine_dynamic(torch.arange(8), 8, -8, 7, 0, 7.0, 0, 0, 0, 0.0, 0)
    with pytest.raises(TypeError, match="codes must be"):
        OPS.dequantize_affine(torch.arange(8), ONE, None, 8, True, 0.0)  # int64 -> uint8


def test_valid_calls_match_numpy():
    s = torch.tensor([0.25])
    codes = qa(scale=s, zp=torch.tensor([3], dtype=torch.int64), qmin=0, qmax=15)
    ref = np.clip(np.rint(X.numpy() * np.float32(4.0)) + 3, 0, 15)
    np.testing.assert_array_equal(codes.numpy(), ref)
    deq = OPS.dequantize_affine(codes, s, torch.tensor([3], dtype=torch.int16), 8, False, 0.0)
    np.testing.assert_array_equal(deq.numpy(), ((ref - 3) * 0.25).astype(np.float32))
    pcm = torch.tensor([0, 1000, -1000], dtype=torch.int16)
    assert OPS.mulaw_decode(OPS.mulaw_encode(pcm)).dtype == torch.int16
