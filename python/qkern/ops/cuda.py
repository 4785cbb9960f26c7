"""CUDA kernels of the qkern:: ops: thin calls into the torch-free ``qkern._cuda``.

The main tensor of each op (x, codes, packed, pcm) must be on a CUDA device; the small ones
(scale, zero_point, codebook tables, lut) are moved there when they live elsewhere. Inputs are
converted to the kernel dtype and made contiguous like the CPU binding does (numpy forcecast),
and the same argument errors are raised. A quantize op raises NonFiniteError (a ValueError,
"input contains NaN or Inf") when its input holds NaN or Inf; reading that flag synchronizes
with the current stream. Importing this module without ``qkern._cuda`` registers nothing.
"""

from __future__ import annotations

import torch

from .schemas import LIB

try:
    from .. import _cuda
except ImportError:  # built without nvcc: the CUDA dispatch key stays unregistered
    _cuda = None

try:
    from .cpu import NonFiniteError
except ImportError:  # pragma: no cover - qkern._C missing; keep the CUDA path usable

    class NonFiniteError(ValueError):
        """Raised by a quantize op whose input holds NaN or Inf."""


_NUM_ROUNDINGS = 7
_AFFINE_RULES = (0, 1, 2, 3)  # absmax, minmax, pow2 (MX), mean|x|
_CODEBOOK_RULES = (0, 2, 3)  # absmax, pow2 (MX), mean|x|


def _seed(seed: int) -> int:
    """The uint64 seed bits as the int64 the extension takes."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return s - (1 << 64) if s >= (1 << 63) else s


def _main(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    if t.device.type != "cuda":
        raise ValueError(f"{what}: expected a CUDA tensor, got one on {t.device}")
    return _as(t, dtype, t.device)


def _as(t: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    if t.device != device:
        t = t.to(device)
    if t.dtype != dtype:
        same_bytes = {t.dtype, dtype} == {torch.int8, torch.uint8}
        t = t.view(dtype) if same_bytes else t.to(dtype)
    return t.contiguous()


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(dev: torch.device) -> int:
    return torch.cuda.current_stream(dev).cuda_stream


def _check_groups(n: int, group: int, what: str) -> None:
    if group <= 0:
        raise ValueError(f"{what}: group_size must be positive")
    if n % group != 0:
        raise ValueError(f"{what}: group_size {group} does not divide {n} elements")


def _check_len(t: torch.Tensor, want: int, name: str) -> None:
    if t.numel() != want:
        raise ValueError(f"{name} has {t.numel()} elements, expected {want}")


def _check_rounding(rounding: int, shape: int = 0) -> None:
    if not 0 <= rounding < _NUM_ROUNDINGS:
        raise ValueError("unknown rounding mode id")
    if not 0 <= shape <= 2:
        raise ValueError("unknown quantizer id")


def _check_zero_points(zp: torch.Tensor | None, lo: int, hi: int) -> None:
    if zp is not None and zp.numel() and (int(zp.min()) < lo or int(zp.max()) > hi):
        raise ValueError(f"zero_point is outside the code range [{lo}, {hi}]")


def _check_code_range(qmin: int, qmax: int) -> None:
    if qmin > qmax or qmin < -128 or qmax > 255 or (qmin < 0 and qmax > 127):
        raise ValueError(f"code range [{qmin}, {qmax}] does not fit one signed or unsigned byte")


def _check_rule(rule: int, allowed: tuple[int, ...], what: str) -> None:
    if rule not in allowed:
        raise ValueError(f"{what}: unknown scale rule id {rule}")


def _table(values, value_codes, dev):
    values = _as(values, torch.float32, values.device)  # checked where it lives (often CPU)
    n = values.numel()
    if not 1 <= n <= 256:
        raise ValueError("codebook must have 1..256 values")
    _check_len(value_codes, n, "value_codes")
    if n > 1 and not bool((values[1:] > values[:-1]).all()):
        raise ValueError("codebook values must be strictly ascending")
    return _as(values, torch.float32, dev), _as(value_codes, torch.uint8, dev), n


def _raise_if_bad(bad: torch.Tensor) -> None:
    if int(bad.item()):
        raise NonFiniteError("input contains NaN or Inf")


def quantize_affine(x, scale, zero_point, group_size, qmin, qmax, rounding, shape, dz_half, seed):
    x = _main(x, torch.float32, "quantize_affine")
    dev, n = x.device, x.numel()
    _check_groups(n, group_size, "quantize_affine")
    scale = _as(scale, torch.float32, dev)
    zero_point = _as(zero_point, torch.int32, dev)
    _check_len(scale, n // group_size, "scale")
    if zero_point is not None:
        _check_len(zero_point, n // group_size, "zero_point")
        _check_zero_points(zero_point, qmin, qmax)
    _check_rounding(rounding, shape)
    _check_code_range(qmin, qmax)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=dev)
    bad = torch.empty(1, dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        _cuda.quantize_affine(x.data_ptr(), n, group_size, scale.data_ptr(), _addr(zero_point),
                              qmin, qmax, rounding, shape, dz_half, _seed(seed), codes.data_ptr(),
                              bad.data_ptr(), dev.index, _stream(dev))
    _raise_if_bad(bad)
    return codes


def quantize_affine_dynamic(x, group_size, qmin, qmax, rule, qpos, emax, rounding, shape,
                            dz_half, seed):
    x = _main(x, torch.float32, "quantize_affine_dynamic")
    dev, n = x.device, x.numel()
    _check_groups(n, group_size, "quantize_affine_dynamic")
    _check_rounding(rounding, shape)
    _check_rule(rule, _AFFINE_RULES, "quantize_affine_dynamic")
    _check_code_range(qmin, qmax)
    g = n // group_size
    codes = torch.empty(x.shape, dtype=torch.uint8, device=dev)
    scale = torch.empty(g, dtype=torch.float32, device=dev)
    zp = torch.empty(g, dtype=torch.int32, device=dev)
    bad = torch.empty(1, dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        _cuda.quantize_affine_dynamic(x.data_ptr(), n, group_size, qmin, qmax, rounding, shape,
                                      dz_half, _seed(seed), rule, qpos, emax, scale.data_ptr(),
                                      zp.data_ptr(), codes.data_ptr(), bad.data_ptr(), dev.index,
                                      _stream(dev))
    _raise_if_bad(bad)
    return codes, scale, zp


def dequantize_affine(codes, scale, zero_point, group_size, is_signed, offset):
    codes = _main(codes, torch.uint8, "dequantize_affine")
    dev, n = codes.device, codes.numel()
    _check_groups(n, group_size, "dequantize_affine")
    scale = _as(scale, torch.float32, dev)
    zero_point = _as(zero_point, torch.int32, dev)
    _check_len(scale, n // group_size, "scale")
    if zero_point is not None:
        _check_len(zero_point, n // group_size, "zero_point")
        _check_zero_points(zero_point, -128 if is_signed else 0, 127 if is_signed else 255)
    out = torch.empty(codes.shape, dtype=torch.float32, device=dev)
    with torch.cuda.device(dev):
        _cuda.dequantize_affine(codes.data_ptr(), n, group_size, scale.data_ptr(),
                                _addr(zero_point), bool(is_signed), offset, out.data_ptr(),
                                dev.index, _stream(dev))
    return out


def quantize_codebook(x, scale, values, value_codes, sign_bit, group_size, rounding, seed):
    x = _main(x, torch.float32, "quantize_codebook")
    dev, n = x.device, x.numel()
    _check_groups(n, group_size, "quantize_codebook")
    scale = _as(scale, torch.float32, dev)
    _check_len(scale, n // group_size, "scale")
    values, value_codes, nv = _table(values, value_codes, dev)
    _check_rounding(rounding)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=dev)
    bad = torch.empty(1, dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        _cuda.quantize_codebook(x.data_ptr(), n, group_size, scale.data_ptr(), values.data_ptr(),
                                value_codes.data_ptr(), nv, sign_bit, rounding, _seed(seed),
                                codes.data_ptr(), bad.data_ptr(), dev.index, _stream(dev))
    _raise_if_bad(bad)
    return codes


def quantize_codebook_dynamic(x, values, value_codes, sign_bit, group_size, rule, max_value,
                              emax, rounding, seed):
    x = _main(x, torch.float32, "quantize_codebook_dynamic")
    dev, n = x.device, x.numel()
    _check_groups(n, group_size, "quantize_codebook_dynamic")
    values, value_codes, nv = _table(values, value_codes, dev)
    _check_rounding(rounding)
    _check_rule(rule, _CODEBOOK_RULES, "quantize_codebook_dynamic")
    codes = torch.empty(x.shape, dtype=torch.uint8, device=dev)
    scale = torch.empty(n // group_size, dtype=torch.float32, device=dev)
    bad = torch.empty(1, dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        _cuda.quantize_codebook_dynamic(x.data_ptr(), n, group_size, values.data_ptr(),
                                        value_codes.data_ptr(), nv, sign_bit, rounding,
                                        _seed(seed), rule, max_value, emax, scale.data_ptr(),
                                        codes.data_ptr(), bad.data_ptr(), dev.index,
                                        _stream(dev))
    _raise_if_bad(bad)
    return codes, scale


def dequantize_lut(codes, scale, lut, group_size):
    codes = _main(codes, torch.uint8, "dequantize_lut")
    dev, n = codes.device, codes.numel()
    _check_groups(n, group_size, "dequantize_lut")
    scale = _as(scale, torch.float32, dev)
    lut = _as(lut, torch.float32, dev)
    _check_len(scale, n // group_size, "scale")
    _check_len(lut, 256, "lut")
    out = torch.empty(codes.shape, dtype=torch.float32, device=dev)
    with torch.cuda.device(dev):
        _cuda.dequantize_lut(codes.data_ptr(), n, group_size, scale.data_ptr(), lut.data_ptr(),
                             out.data_ptr(), dev.index, _stream(dev))
    return out


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def pack_bits(codes, bits, msb):
    _check_bits(bits)
    codes = _main(codes, torch.uint8, "pack_bits")
    dev, n = codes.device, codes.numel()
    out = torch.empty((n * bits + 7) // 8, dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        _cuda.pack_bits(codes.data_ptr(), n, bits, bool(msb), out.data_ptr(), dev.index,
                        _stream(dev))
    return out


def unpack_bits(packed, bits, n, msb):
    _check_bits(bits)
    if n < 0:
        raise ValueError("n must be >= 0")
    packed = _main(packed, torch.uint8, "unpack_bits")
    dev = packed.device
    need = (n * bits + 7) // 8
    if packed.numel() < need:
        raise ValueError(f"packed buffer too short: {packed.numel()} bytes, {n} codes of {bits} "
                         f"bits need {need}")
    out = torch.empty(n, dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        _cuda.unpack_bits(packed.data_ptr(), n, bits, bool(msb), out.data_ptr(), dev.index,
                          _stream(dev))
    return out


def _g711(fn_name: str, in_dtype: torch.dtype, out_dtype: torch.dtype):
    def impl(t):
        t = _main(t, in_dtype, fn_name)
        dev = t.device
        out = torch.empty(t.shape, dtype=out_dtype, device=dev)
        with torch.cuda.device(dev):
            getattr(_cuda, fn_name)(t.data_ptr(), t.numel(), out.data_ptr(), dev.index,
                                    _stream(dev))
        return out

    impl.__name__ = fn_name
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
    "mulaw_encode": _g711("mulaw_encode", torch.int16, torch.uint8),
    "mulaw_decode": _g711("mulaw_decode", torch.uint8, torch.int16),
    "alaw_encode": _g711("alaw_encode", torch.int16, torch.uint8),
    "alaw_decode": _g711("alaw_decode", torch.uint8, torch.int16),
}

if _cuda is not None:
    for _name, _fn in _IMPLS.items():
        LIB.impl(_name, _fn, "CUDA")
