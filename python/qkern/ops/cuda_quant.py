"""CUDA kernels of the element-wise qkern:: ops (quantize, dequantize, bit packing, G.711):
thin calls into the torch-free ``qkern._cuda``, and the tensor plumbing ``cuda.py``'s matmuls
share.

The main tensor of each op (x, codes, packed, pcm) must be on a CUDA device; the small ones
(scale, zero_point, codebook tables, lut) are moved there when they live elsewhere. Inputs are
converted to the kernel dtype and made contiguous like the CPU binding does (numpy forcecast),
and the argument errors of ``checks.py`` are raised. A quantize op raises NonFiniteError (a
ValueError, "input contains NaN or Inf") when its input holds NaN or Inf; reading that flag
synchronizes with the current stream.
"""

from __future__ import annotations

import torch

from . import checks

try:
    from .. import _cuda
except ImportError:  # built without nvcc: cuda.py registers kernels that say so
    _cuda = None

try:
    from .cpu import NonFiniteError
except ImportError:  # pragma: no cover - qkern._C missing; keep the CUDA path usable

    class NonFiniteError(ValueError):
        """Raised by a quantize op whose input holds NaN or Inf."""


def seed_bits(seed: int) -> int:
    """The uint64 seed bits as the int64 the extension takes."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return s - (1 << 64) if s >= (1 << 63) else s


def main_tensor(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    if t.device.type != "cuda":
        raise ValueError(f"{what}: expected a CUDA tensor, got one on {t.device}")
    return as_device(t, dtype, t.device)


def as_device(t: torch.Tensor | None, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor | None:
    if t is None:
        return None
    if t.device != device:
        t = t.to(device)
    if t.dtype != dtype:
        same_bytes = {t.dtype, dtype} == {torch.int8, torch.uint8}
        t = t.view(dtype) if same_bytes else t.to(dtype)
    return t.contiguous()


def addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def stream(dev: torch.device) -> int:
    return torch.cuda.current_stream(dev).cuda_stream


def raise_if_bad(bad: torch.Tensor) -> None:
    if int(bad.item()):
        raise NonFiniteError("input contains NaN or Inf")


def quantize_affine(x, scale, zero_point, group_size, qmin, qmax, rounding, shape, dz_half, seed):
    checks.quantize_affine(x, scale, zero_point, group_size, qmin, qmax, rounding, shape,
                           dz_half)
    x = main_tensor(x, torch.float32, "quantize_affine")
    dev, n = x.device, x.numel()
    scale = as_device(scale, torch.float32, dev)
    zero_point = as_device(zero_point, torch.int32, dev)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=dev)
    bad = torch.empty(1, dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        _cuda.quantize_affine(x.data_ptr(), n, group_size, scale.data_ptr(), addr(zero_point),
                              qmin, qmax, rounding, shape, dz_half, seed_bits(seed),
                              codes.data_ptr(), bad.data_ptr(), dev.index, stream(dev))
    raise_if_bad(bad)
    return codes


def quantize_affine_dynamic(x, group_size, qmin, qmax, rule, qpos, emax, rounding, shape,
                            dz_half, seed):
    checks.quantize_affine_dynamic(x, group_size, qmin, qmax, rule, qpos, rounding, shape,
                                   dz_half)
    x = main_tensor(x, torch.float32, "quantize_affine_dynamic")
    dev, n = x.device, x.numel()
    checks.check_emax(emax)
    g = n // group_size
    codes = torch.empty(x.shape, dtype=torch.uint8, device=dev)
    scale = torch.empty(g, dtype=torch.float32, device=dev)
    zp = torch.empty(checks.dynamic_zero_points(n, group_size, rule), dtype=torch.int32,
                     device=dev)
    zp_addr = zp.data_ptr() if zp.numel() else 0  # null: the kernel writes no zero points
    bad = torch.empty(1, dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        _cuda.quantize_affine_dynamic(x.data_ptr(), n, group_size, qmin, qmax, rounding, shape,
                                      dz_half, seed_bits(seed), rule, qpos, emax, scale.data_ptr(),
                                      zp_addr, codes.data_ptr(), bad.data_ptr(), dev.index,
                                      stream(dev))
    raise_if_bad(bad)
    return codes, scale, zp


def dequantize_affine(codes, scale, zero_point, group_size, is_signed, offset):
    checks.dequantize_affine(codes, scale, zero_point, group_size, is_signed)
    codes = main_tensor(codes, torch.uint8, "dequantize_affine")
    dev, n = codes.device, codes.numel()
    scale = as_device(scale, torch.float32, dev)
    zero_point = as_device(zero_point, torch.int32, dev)
    out = torch.empty(codes.shape, dtype=torch.float32, device=dev)
    with torch.cuda.device(dev):
        _cuda.dequantize_affine(codes.data_ptr(), n, group_size, scale.data_ptr(),
                                addr(zero_point), bool(is_signed), offset, out.data_ptr(),
                                dev.index, stream(dev))
    return out


def quantize_codebook(x, scale, values, value_codes, sign_bit, group_size, rounding, seed):
    nv = checks.quantize_codebook(x, scale, values, value_codes, sign_bit, group_size, rounding)
    x = main_tensor(x, torch.float32, "quantize_codebook")
    dev, n = x.device, x.numel()
    scale = as_device(scale, torch.float32, dev)
    values, value_codes = as_device(values, torch.float32, dev), as_device(value_codes,
                                                                            torch.uint8, dev)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=dev)
    bad = torch.empty(1, dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        _cuda.quantize_codebook(x.data_ptr(), n, group_size, scale.data_ptr(), values.data_ptr(),
                                value_codes.data_ptr(), nv, sign_bit, rounding, seed_bits(seed),
                                codes.data_ptr(), bad.data_ptr(), dev.index, stream(dev))
    raise_if_bad(bad)
    return codes


def quantize_codebook_dynamic(x, values, value_codes, sign_bit, group_size, rule, max_value,
                              emax, rounding, seed):
    nv = checks.quantize_codebook_dynamic(x, values, value_codes, sign_bit, group_size, rule,
                                          max_value, rounding)
    x = main_tensor(x, torch.float32, "quantize_codebook_dynamic")
    dev, n = x.device, x.numel()
    checks.check_emax(emax)
    values, value_codes = as_device(values, torch.float32, dev), as_device(value_codes,
                                                                            torch.uint8, dev)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=dev)
    scale = torch.empty(n // group_size, dtype=torch.float32, device=dev)
    bad = torch.empty(1, dtype=torch.int32, device=dev)
    with torch.cuda.device(dev):
        _cuda.quantize_codebook_dynamic(x.data_ptr(), n, group_size, values.data_ptr(),
                                        value_codes.data_ptr(), nv, sign_bit, rounding,
                                        seed_bits(seed), rule, max_value, emax, scale.data_ptr(),
                                        codes.data_ptr(), bad.data_ptr(), dev.index,
                                        stream(dev))
    raise_if_bad(bad)
    return codes, scale


def dequantize_lut(codes, scale, lut, group_size):
    codes = main_tensor(codes, torch.uint8, "dequantize_lut")
    dev, n = codes.device, codes.numel()
    scale = as_device(scale, torch.float32, dev)
    lut = as_device(lut, torch.float32, dev)
    checks.dequantize_lut(n, scale, lut, group_size)
    out = torch.empty(codes.shape, dtype=torch.float32, device=dev)
    with torch.cuda.device(dev):
        _cuda.dequantize_lut(codes.data_ptr(), n, group_size, scale.data_ptr(), lut.data_ptr(),
                             out.data_ptr(), dev.index, stream(dev))
    return out


def pack_bits(codes, bits, msb):
    checks.check_bits(bits)
    codes = main_tensor(codes, torch.uint8, "pack_bits")
    dev, n = codes.device, codes.numel()
    out = torch.empty((n * bits + 7) // 8, dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        _cuda.pack_bits(codes.data_ptr(), n, bits, bool(msb), out.data_ptr(), dev.index,
                        stream(dev))
    return out


def unpack_bits(packed, bits, n, msb):
    checks.check_unpack(packed, bits, n)
    packed = main_tensor(packed, torch.uint8, "unpack_bits")
    dev = packed.device
    out = torch.empty(n, dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        _cuda.unpack_bits(packed.data_ptr(), n, bits, bool(msb), out.data_ptr(), dev.index,
                          stream(dev))
    return out


def g711(fn_name: str, in_dtype: torch.dtype, out_dtype: torch.dtype):
    def impl(t):
        checks.g711(fn_name, t)
        t = main_tensor(t, in_dtype, fn_name)
        dev = t.device
        out = torch.empty(t.shape, dtype=out_dtype, device=dev)
        with torch.cuda.device(dev):
            getattr(_cuda, fn_name)(t.data_ptr(), t.numel(), out.data_ptr(), dev.index,
                                    stream(dev))
        return out

    impl.__name__ = fn_name
    return impl


IMPLS = {
    "quantize_affine": quantize_affine,
    "quantize_affine_dynamic": quantize_affine_dynamic,
    "dequantize_affine": dequantize_affine,
    "quantize_codebook": quantize_codebook,
    "quantize_codebook_dynamic": quantize_codebook_dynamic,
    "dequantize_lut": dequantize_lut,
    "pack_bits": pack_bits,
    "unpack_bits": unpack_bits,
    "mulaw_encode": g711("mulaw_encode", torch.int16, torch.uint8),
    "mulaw_decode": g711("mulaw_decode", torch.uint8, torch.int16),
    "alaw_encode": g711("alaw_encode", torch.int16, torch.uint8),
    "alaw_decode": g711("alaw_decode", torch.uint8, torch.int16),
}
