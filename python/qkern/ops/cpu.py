"""CPU kernels of the qkern:: ops: thin calls into the torch-free ``qkern._C``."""

from __future__ import annotations

import numpy as np
import torch

from .. import _C
from .schemas import LIB


class NonFiniteError(ValueError):
    """Raised by a quantize op whose input holds NaN or Inf (the caller adds details)."""


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().contiguous().numpy()


def _t(a: np.ndarray, shape) -> torch.Tensor:
    return torch.from_numpy(a).view(shape)


def _seed(seed: int) -> int:
    return seed & 0xFFFFFFFFFFFFFFFF  # the schema carries uint64 bits in an int64


def _check_finite(bad: bool) -> None:
    if bad:
        raise NonFiniteError("input contains NaN or Inf")


def quantize_affine(x, scale, zero_point, group_size, qmin, qmax, rounding, shape, dz_half, seed):
    codes, bad = _C.quantize_affine(_np(x), _np(scale), _np(zero_point), group_size, qmin, qmax,
                                    rounding, shape, dz_half, _seed(seed))
    _check_finite(bad)
    return _t(codes, x.shape)


def quantize_affine_dynamic(x, group_size, qmin, qmax, rule, qpos, emax, rounding, shape,
                            dz_half, seed):
    codes, scale, zp, bad = _C.quantize_affine_dynamic(
        _np(x), group_size, qmin, qmax, rule, qpos, emax, rounding, shape, dz_half, _seed(seed))
    _check_finite(bad)
    return _t(codes, x.shape), torch.from_numpy(scale), torch.from_numpy(zp)


def dequantize_affine(codes, scale, zero_point, group_size, is_signed, offset):
    out = _C.dequantize_affine(_np(codes), _np(scale), _np(zero_point), group_size, is_signed,
                               offset)
    return _t(out, codes.shape)


def quantize_codebook(x, scale, values, value_codes, sign_bit, group_size, rounding, seed):
    codes, bad = _C.quantize_codebook(_np(x), _np(scale), _np(values), _np(value_codes),
                                      sign_bit, group_size, rounding, _seed(seed))
    _check_finite(bad)
    return _t(codes, x.shape)


def quantize_codebook_dynamic(x, values, value_codes, sign_bit, group_size, rule, max_value,
                              emax, rounding, seed):
    codes, scale, bad = _C.quantize_codebook_dynamic(
        _np(x), _np(values), _np(value_codes), sign_bit, group_size, rule, max_value, emax,
        rounding, _seed(seed))
    _check_finite(bad)
    return _t(codes, x.shape), torch.from_numpy(scale)


def dequantize_lut(codes, scale, lut, group_size):
    return _t(_C.dequantize_lut(_np(codes), _np(scale), _np(lut), group_size), codes.shape)


def pack_bits(codes, bits, msb):
    return torch.from_numpy(_C.pack_bits(_np(codes), bits, msb))


def unpack_bits(packed, bits, n, msb):
    return torch.from_numpy(_C.unpack_bits(_np(packed), bits, n, msb))


def _g711(fn):
    def impl(t):
        return _t(fn(_np(t)), t.shape)

    return impl


_IMPLS = {
    "quantize_affine": quantize_affine,
    "quantize_affine_dynamic": quantize_affine_dynamic,
    "dequantize_affine": dequantize_affine,
    "quantize_codebook": quantize_codebook,
    "quantize_codebook_dynamic": quantize_codebook_dynamic,
    "dequantize_lut": dequantize_lut,
    "pack_bits": pack_bits,
    "unpack_bits": unpack_bits,
    "mulaw_encode": _g711(_C.mulaw_encode),
    "mulaw_decode": _g711(_C.mulaw_decode),
    "alaw_encode": _g711(_C.alaw_encode),
    "alaw_decode": _g711(_C.alaw_decode),
}

for _name, _fn in _IMPLS.items():
    LIB.impl(_name, _fn, "CPU")
