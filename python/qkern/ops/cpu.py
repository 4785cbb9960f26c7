"""CPU kernels of the element-wise qkern:: ops: the checks of ``checks.py`` (shared with the
CUDA kernels), then the torch-free ``qkern._C`` over ``data_ptr()`` addresses (``raw.py``)."""

from __future__ import annotations

import torch

from .. import _C
from . import checks
from .raw import contig, empty, out_tensor, ptr
from .schemas import LIB, SCHEMAS

F32, I32, U8, I16 = torch.float32, torch.int32, torch.uint8, torch.int16
BYTES = (U8, torch.int8)  # code outputs: the bytes are the same


class NonFiniteError(ValueError):
    """Raised by a quantize op whose input holds NaN or Inf (the caller adds details)."""


def _seed(seed: int) -> int:
    return seed & 0xFFFFFFFFFFFFFFFF  # the schema carries uint64 bits in an int64


def _check_finite(bad: bool) -> None:
    if bad:
        raise NonFiniteError("input contains NaN or Inf")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """uint8 codes as the kernels read them (int8 bytes reinterpreted, others converted)."""
    return contig(t.view(U8) if t.dtype == torch.int8 else t, U8)


def _out(op, t, n, dtypes, shape, name="out"):
    """The output: allocated (``t`` None: a functional op) or the caller's (an ``*_out`` op)."""
    if t is None:
        return empty(shape, dtypes[0])
    return out_tensor(f"{op}_out", t, n, dtypes, name)


# Each kernel below is the ``*_out`` op given its outputs and the functional op given None.

def quantize_affine(x, scale, zero_point, group_size, qmin, qmax, rounding, shape, dz_half, seed,
                    out=None):
    checks.quantize_affine(x, scale, zero_point, group_size, qmin, qmax, rounding, shape,
                           dz_half)
    x, scale, zp = contig(x, F32), contig(scale, F32), contig(zero_point, I32)
    n = x.numel()
    codes = _out("quantize_affine", out, n, BYTES, x.shape)
    bad = _C.quantize_affine_raw(ptr(x), n, ptr(scale), ptr(zp), group_size, qmin, qmax,
                                 rounding, shape, dz_half, _seed(seed), ptr(codes))
    _check_finite(bad)
    return codes


def quantize_affine_dynamic(x, group_size, qmin, qmax, rule, qpos, emax, rounding, shape,
                            dz_half, seed, codes=None, scale=None, zero_point=None):
    op = "quantize_affine_dynamic"
    checks.quantize_affine_dynamic(x, group_size, qmin, qmax, rule, qpos, rounding, shape,
                                   dz_half)
    x = contig(x, F32)
    n = x.numel()
    checks.check_emax(emax)
    codes = _out(op, codes, n, BYTES, x.shape, "codes")
    scale = _out(op, scale, n // group_size, (F32,), n // group_size, "scale")
    nz = checks.dynamic_zero_points(n, group_size, rule)
    zero_point = _out(op, zero_point, nz, (I32,), nz, "zero_point")
    bad = _C.quantize_affine_dynamic_raw(ptr(x), n, group_size, qmin, qmax, rule, qpos, emax,
                                         rounding, shape, dz_half, _seed(seed), ptr(scale),
                                         ptr(zero_point), ptr(codes))
    _check_finite(bad)
    return codes, scale, zero_point


def dequantize_affine(codes, scale, zero_point, group_size, is_signed, offset, out=None):
    checks.dequantize_affine(codes, scale, zero_point, group_size, is_signed)
    codes, scale, zp = _bytes(codes), contig(scale, F32), contig(zero_point, I32)
    n = codes.numel()
    out = _out("dequantize_affine", out, n, (F32,), codes.shape)
    _C.dequantize_affine_raw(ptr(codes), n, ptr(scale), ptr(zp), group_size, is_signed, offset,
                             ptr(out))
    return out


def quantize_codebook(x, scale, values, value_codes, sign_bit, group_size, rounding, seed,
                      out=None):
    nv = checks.quantize_codebook(x, scale, values, value_codes, sign_bit, group_size, rounding)
    x, scale = contig(x, F32), contig(scale, F32)
    values, value_codes = contig(values, F32), _bytes(value_codes)
    n = x.numel()
    codes = _out("quantize_codebook", out, n, BYTES, x.shape)
    bad = _C.quantize_codebook_raw(ptr(x), n, ptr(scale), ptr(values), ptr(value_codes), nv,
                                   sign_bit, group_size, rounding, _seed(seed), ptr(codes))
    _check_finite(bad)
    return codes


def quantize_codebook_dynamic(x, values, value_codes, sign_bit, group_size, rule, max_value,
                              emax, rounding, seed, codes=None, scale=None):
    op = "quantize_codebook_dynamic"
    nv = checks.quantize_codebook_dynamic(x, values, value_codes, sign_bit, group_size, rule,
                                          max_value, rounding)
    x, values, value_codes = contig(x, F32), contig(values, F32), _bytes(value_codes)
    n = x.numel()
    checks.check_emax(emax)
    codes = _out(op, codes, n, BYTES, x.shape, "codes")
    scale = _out(op, scale, n // group_size, (F32,), n // group_size, "scale")
    bad = _C.quantize_codebook_dynamic_raw(ptr(x), n, ptr(values), ptr(value_codes), nv,
                                           sign_bit, group_size, rule, max_value, emax,
                                           rounding, _seed(seed), ptr(scale), ptr(codes))
    _check_finite(bad)
    return codes, scale


def dequantize_lut(codes, scale, lut, group_size, out=None):
    codes, scale, lut = _bytes(codes), contig(scale, F32), contig(lut, F32)
    n = codes.numel()
    checks.dequantize_lut(n, scale, lut, group_size)
    out = _out("dequantize_lut", out, n, (F32,), codes.shape)
    _C.dequantize_lut_raw(ptr(codes), n, ptr(scale), ptr(lut), group_size, ptr(out))
    return out


def pack_bits(codes, bits, msb):
    checks.check_bits(bits)
    codes = _bytes(codes)
    n = codes.numel()
    out = torch.empty((n * bits + 7) // 8, dtype=U8)
    _C.pack_bits_raw(ptr(codes), n, bits, msb, ptr(out))
    return out


def unpack_bits(packed, bits, n, msb):
    packed = _bytes(packed)
    checks.check_unpack(packed, bits, n)
    out = torch.empty(n, dtype=U8)
    _C.unpack_bits_raw(ptr(packed), n, bits, msb, ptr(out))
    return out


def _g711(op: str, src_dtype: torch.dtype, dst_dtype: torch.dtype):
    def impl(t):
        checks.g711(op, t)
        t = contig(t, src_dtype)
        out = torch.empty(t.shape, dtype=dst_dtype)
        _C.g711_raw(op, ptr(t), t.numel(), ptr(out))
        return out

    impl.__name__ = op
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
    "mulaw_encode": _g711("mulaw_encode", I16, U8),
    "mulaw_decode": _g711("mulaw_decode", U8, I16),
    "alaw_encode": _g711("alaw_encode", I16, U8),
    "alaw_decode": _g711("alaw_decode", U8, I16),
}



def _returns_nothing(fn):
    def impl(*args):
        fn(*args)

    impl.__name__ = f"{fn.__name__}_out"
    return impl


for _name, _fn in _IMPLS.items():
    LIB.impl(_name, _fn, "CPU")
    if f"{_name}_out" in SCHEMAS:  # the same kernel with the caller's outputs
        LIB.impl(f"{_name}_out", _returns_nothing(_fn), "CPU")
