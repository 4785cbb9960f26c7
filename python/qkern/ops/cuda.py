"""CUDA kernels of the qkern:: ops: thin calls into the torch-free ``qkern._cuda``.

The main tensor of each op (x, codes, packed, pcm) must be on a CUDA device; the small ones
(scale, zero_point, codebook tables, lut) are moved there when they live elsewhere. Inputs are
converted to the kernel dtype and made contiguous like the CPU binding does (numpy forcecast),
and the same argument errors are raised. A quantize op raises NonFiniteError (a ValueError,
"input contains NaN or Inf") when its input holds NaN or Inf; reading that flag synchronizes
with the current stream. Imported without ``qkern._cuda``, this module registers CUDA kernels
that raise a RuntimeError saying so.

The quantized matmuls (``gemm_w4``, ``gemm_lut4``, ``gemm_w8a8``, ``gemm_w8a16``) run on the
packed buffers of the CPU ops unchanged; what each guarantees relative to the CPU op is in
docs/numerics.md "CUDA matmuls". ``emulate(op, *args)`` runs the same CUDA implementation on
the host (every kernel thread by thread, over CPU tensors) for tests without a GPU.
"""

from __future__ import annotations

import math

import torch

from . import lut4, w4, w8  # noqa: F401  (the matmul schemas this module registers kernels for)
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


# ---- quantized matmuls ------------------------------------------------------------------------

_PATHS = {"auto": 0, "gemv": 1, "gemm": 2}
_W8A8_MAX_K = 132104  # K * 127 * 128 <= 2^31 - 1
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Runner:
    """Where a matmul runs: on the main tensor's CUDA device, or (``emulate``) on the host
    through the ``emulate_*`` twins of the launchers. ``path``: 0 auto, 1 GEMV, 2 GEMM."""

    def __init__(self, emulate: bool = False, path: int = 0, reverse: bool = False):
        if path not in _PATHS.values():
            raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
        self.emulate, self.path, self.reverse = emulate, path, reverse

    def main(self, t: torch.Tensor, what: str) -> torch.device:
        want = "cpu" if self.emulate else "cuda"
        if t.device.type != want:
            raise ValueError(f"{what}: expected a {want.upper()} tensor, got one on {t.device}")
        return t.device

    def call(self, name: str, dev: torch.device, *args) -> None:
        if self.emulate:
            getattr(_cuda, "emulate_" + name)(*args, self.path, self.reverse)
        else:
            with torch.cuda.device(dev):
                getattr(_cuda, name)(*args, self.path, dev.index, _stream(dev))


def _aligned(t: torch.Tensor | None, dtype: torch.dtype, dev: torch.device):
    """``t`` as a contiguous ``dtype`` tensor on ``dev`` at a 16-byte aligned address (the
    kernels read it with 16-byte vector loads)."""
    t = _as(t, dtype, dev)
    if t is not None and t.numel() and t.data_ptr() % 16:
        t = t.clone()
    return t


def _need(t: torch.Tensor | None, want: int, what: str, name: str) -> None:
    if t is not None and t.numel() != want:
        raise ValueError(f"{what}: {name} has {t.numel()} elements, expected {want}")


def _gemm_w4(run: _Runner, x, packed, scales, zeros, bias, N, K, group_size, mode):
    what = "gemm_w4"
    dev = run.main(x, what)
    if not x.is_floating_point():
        raise ValueError(f"{what}: x must be floating point, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{what}: x must be (..., K = {K}), got shape {tuple(x.shape)}")
    if N < 0:
        raise ValueError(f"{what}: N must be >= 0, got {N}")
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"{what}: group_size must be a positive multiple of 32, got {group_size}")
    if K <= 0 or K % group_size:
        raise ValueError(f"{what}: K = {K} must be a positive multiple of group_size "
                         f"{group_size} (and so of 32)")
    if mode not in (0, 1):
        raise ValueError(f"{what}: mode must be 0 (exact) or 1 (fast), got {mode}")
    tiles = ((N + 7) // 8, K // group_size, 8)
    for name, t in (("scales", scales), ("zeros", zeros)):  # (N, K/G) would be silently wrong
        if t is not None and tuple(t.shape) != tiles:
            raise ValueError(f"{what}: {name} must be in pack_weight's tile layout {tiles}, "
                             f"got shape {tuple(t.shape)}")
    n_pad, nb = tiles[0] * 8, K // 32
    x32 = _aligned(x, torch.float32, dev)
    m = x32.numel() // K
    packed = _aligned(packed, torch.uint8, dev)
    scales = _aligned(scales, torch.float32, dev)
    zeros = _as(zeros, torch.int32, dev)
    bias = _as(bias, torch.float32, dev)
    _need(packed, n_pad * K // 2, what, "packed")
    _need(scales, n_pad * (K // group_size), what, "scales (tile layout, N padded to 8)")
    _need(zeros, n_pad * (K // group_size), what, "zeros (tile layout, N padded to 8)")
    _need(bias, N, what, "bias")
    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32, device=dev)
    if m == 0 or N == 0:
        return y
    xq = dx = xs = bad = None
    if mode == 1:  # workspaces of the activation quantization
        xq = torch.empty(m * K, dtype=torch.int8, device=dev)
        dx = torch.empty(m * nb, dtype=torch.float32, device=dev)
        xs = torch.empty(m * nb, dtype=torch.float32, device=dev)
        bad = torch.empty(1, dtype=torch.int32, device=dev)
    run.call(what, dev, x32.data_ptr(), m, packed.data_ptr(), scales.data_ptr(), _addr(zeros),
             _addr(bias), N, K, group_size, mode, _addr(xq), _addr(dx), _addr(xs), _addr(bad),
             y.data_ptr())
    if bad is not None and int(bad.item()):  # synchronizes with the stream
        raise NonFiniteError(f"{what}: x contains NaN or Inf (the fast mode quantizes x to "
                             "int8; use mode=0 (exact) to propagate them)")
    return y


def _gemm_lut4(run: _Runner, x, packed, scales, table, bias, N, K, group_size):
    what = "gemm_lut4"
    dev = run.main(x, what)
    if N < 0 or K <= 0:
        raise ValueError(f"{what}: N must be >= 0 and K > 0, got N = {N}, K = {K}")
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"{what}: the CUDA kernels need group_size a positive multiple of 32 "
                         f"(32, 64, 128), got {group_size}")
    if K % group_size:
        raise ValueError(f"{what}: group_size {group_size} does not divide K = {K}")
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"{what}: x must be 2-D (M, K) with K = {K}, got shape "
                         f"{tuple(x.shape)}")
    if table.numel() < 16:
        raise ValueError(f"{what}: table needs 16 values, got {table.numel()}")
    x32 = _aligned(x, torch.float32, dev)
    packed = _aligned(packed, torch.uint8, dev)
    scales = _as(scales, torch.float32, dev)
    table = _as(table.reshape(-1)[:16], torch.float32, dev)
    bias = _as(bias, torch.float32, dev)
    _need(packed, N * (K // 2), what, "packed")
    _need(scales, N * (K // group_size), what, "scales")
    _need(bias, N, what, "bias")
    m = x32.shape[0]
    y = torch.empty((m, N), dtype=torch.float32, device=dev)
    if m == 0 or N == 0:
        return y
    run.call(what, dev, x32.data_ptr(), m, packed.data_ptr(), scales.data_ptr(),
             table.data_ptr(), _addr(bias), N, K, group_size, y.data_ptr())
    return y


def _w8_packed_nbytes(n: int, k: int) -> int:
    return (n + 15) // 16 * 16 * ((k + 3) // 4 * 4)


def _gemm_w8(run: _Runner, a8: bool, x, packed_w, w_scale, bias, N, K):
    what = "gemm_w8a8" if a8 else "gemm_w8a16"
    dev = run.main(x, what)
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what}: x must be float32, bfloat16 or float16, got {x.dtype}")
    if N < 0 or K < 0:
        raise ValueError(f"{what}: N and K must be >= 0, got N = {N}, K = {K}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{what}: x must have shape (..., K={K}), got {tuple(x.shape)}")
    want = _w8_packed_nbytes(N, K)
    if packed_w.dtype != torch.int8 or packed_w.numel() != want:
        raise ValueError(f"{what}: packed_w must be the int8 pack_w8 output for N={N}, K={K} "
                         f"({want} bytes), got {packed_w.dtype} with {packed_w.numel()} "
                         "elements")
    if a8 and K > _W8A8_MAX_K:
        raise ValueError(f"{what}: K = {K} exceeds {_W8A8_MAX_K}, the largest K whose int32 "
                         "accumulation cannot overflow")
    _need(w_scale, N, what, "w_scale")
    _need(bias, N, what, "bias")
    m = math.prod(x.shape[:-1])
    x32 = _aligned(x, torch.float32, dev)
    packed_w = _aligned(packed_w, torch.int8, dev)
    w_scale = _as(w_scale.reshape(-1), torch.float32, dev)
    bias = _as(None if bias is None else bias.reshape(-1), torch.float32, dev)
    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32, device=dev)
    if m == 0 or N == 0:
        return y.to(x.dtype)
    if a8:
        kp = (K + 3) // 4 * 4
        xq = torch.empty(m * kp, dtype=torch.int8, device=dev)
        sx = torch.empty(m, dtype=torch.float32, device=dev)
        bad = torch.empty(1, dtype=torch.int32, device=dev)
        run.call(what, dev, x32.data_ptr(), m, packed_w.data_ptr(), w_scale.data_ptr(),
                 _addr(bias), N, K, _addr(xq), sx.data_ptr(), bad.data_ptr(), y.data_ptr())
        if int(bad.item()):  # synchronizes with the stream, as the quantize ops do
            raise NonFiniteError(f"{what}: x contains NaN or Inf")
    else:
        run.call(what, dev, x32.data_ptr(), m, packed_w.data_ptr(), w_scale.data_ptr(),
                 _addr(bias), N, K, y.data_ptr())
    return y.to(x.dtype)


def _gemm_w8a8(run: _Runner, *args):
    return _gemm_w8(run, True, *args)


def _gemm_w8a16(run: _Runner, *args):
    return _gemm_w8(run, False, *args)


_MATMULS = {
    "gemm_w4": _gemm_w4,
    "gemm_lut4": _gemm_lut4,
    "gemm_w8a8": _gemm_w8a8,
    "gemm_w8a16": _gemm_w8a16,
}


def _path_id(path: int | str) -> int:
    return _PATHS[path] if isinstance(path, str) else path


def run_matmul(op: str, *args, path: int | str = "auto"):
    """The CUDA kernel of ``torch.ops.qkern.<op>`` with the kernel family forced: ``path``
    "gemv" (rows of x in chunks of 8), "gemm" or "auto" (what the op itself runs)."""
    if _cuda is None:
        raise RuntimeError("qkern._cuda is not built: no CUDA kernels")
    return _MATMULS[op](_Runner(False, _path_id(path)), *args)


def emulate(op: str, *args, path: int | str = "auto", reverse: bool = False):
    """``torch.ops.qkern.<op>`` (a matmul) as its CUDA implementation computes it, run on the
    host over CPU tensors: the same argument handling, workspaces and launch sequence, every
    kernel step executed thread by thread (``reverse``: threads in reverse order), every
    memory access bounds-checked. Needs ``qkern._cuda``, not a GPU."""
    if _cuda is None:
        raise RuntimeError("qkern._cuda is not built: no CUDA kernels to emulate")
    return _MATMULS[op](_Runner(True, _path_id(path), reverse), *args)


def _device_matmul(op: str):
    def impl(*args):
        return _MATMULS[op](_Runner(), *args)

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
    "mulaw_encode": _g711("mulaw_encode", torch.int16, torch.uint8),
    "mulaw_decode": _g711("mulaw_decode", torch.uint8, torch.int16),
    "alaw_encode": _g711("alaw_encode", torch.int16, torch.uint8),
    "alaw_decode": _g711("alaw_decode", torch.uint8, torch.int16),
    **{op: _device_matmul(op) for op in _MATMULS},
}

_MISSING = ("a CUDA tensor, but qkern was built without its CUDA kernels (qkern._cuda is "
            "missing): rebuild with nvcc available (QKERN_CUDA=ON) or move the tensors to the CPU")


def _missing(op: str):
    def impl(*args, **kwargs):
        raise RuntimeError(f"qkern::{op}: {_MISSING}")

    impl.__name__ = op
    return impl


for _name, _fn in _IMPLS.items():
    LIB.impl(_name, _fn if _cuda is not None else _missing(_name), "CUDA")
