"""Argument checks of the qkern:: ops, one function per rule, used by the fake (meta), CPU and
CUDA implementations alike. Each raises ValueError naming the op. The C++ bindings of the CPU
kernels check sizes again before touching memory (their own safety net)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import _C
from .tiles import check_group, padded, tile_shape

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# the enum values of csrc/core, exported by name from qkern._C
AFFINE_RULES = tuple(_C.SCALE_RULES.values())  # absmax, minmax, pow2 (MX), mean|x|
NUM_ROUNDINGS = _C.NUM_ROUNDINGS
# The largest size and product of sizes the kernels take (2^56, csrc/bindings/checked.h): Python
# ints do not overflow, but the sizes go on to C++ as int64 and are padded and multiplied there.
MAX_SIZE = _C.MAX_SIZE


def size_product(what: str, *sizes: int) -> int:
    """The product of ``sizes``, each and the product in [0, MAX_SIZE] (else ValueError naming
    ``what``): the one place where the ops multiply sizes."""
    out = 1
    for s in sizes:
        if not 0 <= s <= MAX_SIZE:
            raise ValueError(f"{what}: size {s} is outside [0, 2^56]")
        out *= s
        if out > MAX_SIZE:
            raise ValueError(f"{what}: {' x '.join(map(str, sizes))} exceeds 2^56, the largest "
                             "size")
    return out


def check_emax(emax: int) -> None:
    """MX scale exponents: floor(log2 amax) - emax is computed in int32 by the kernels."""
    if not -256 <= emax <= 256:
        raise ValueError(f"emax must be in [-256, 256] (float exponents lie in [-149, 127]), "
                         f"got {emax}")


# ---- element-wise quantize / dequantize / packing ops -----------------------------------------

def check_groups(n: int, group: int, what: str) -> None:
    if group <= 0:
        raise ValueError(f"{what}: group_size must be positive")
    if n % group != 0:
        raise ValueError(f"{what}: group_size {group} does not divide {n} elements")


def check_len(t: torch.Tensor, want: int, name: str) -> None:
    if t.numel() != want:
        raise ValueError(f"{name} has {t.numel()} elements, expected {want}")


def check_rounding(rounding: int, shape: int = 0) -> None:
    if not 0 <= rounding < NUM_ROUNDINGS:
        raise ValueError("unknown rounding mode id")
    if shape not in _C.QUANTIZERS.values():
        raise ValueError("unknown quantizer id")


def check_zero_points(zp: torch.Tensor | None, lo: int, hi: int) -> None:
    if zp is not None and zp.numel() and (int(zp.min()) < lo or int(zp.max()) > hi):
        raise ValueError(f"zero_point is outside the code range [{lo}, {hi}]")


def check_code_range(qmin: int, qmax: int) -> None:
    if qmin >= qmax:
        raise ValueError(f"code range [{qmin}, {qmax}] needs qmin < qmax (one level has no "
                         "scale)")
    if qmin < -128 or qmax > 255 or (qmin < 0 and qmax > 127):
        raise ValueError(f"code range [{qmin}, {qmax}] does not fit one signed or unsigned byte")


# ---- argument values and dtypes of the element-wise ops (checked before any conversion) -------
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_BYTE_DTYPES = (torch.uint8, torch.int8)


def check_float_input(op: str, t: torch.Tensor, name: str) -> None:
    """A floating-point tensor (converted to float32 by the kernels, never from integers)."""
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def check_dtype(op: str, t: torch.Tensor | None, name: str, allowed: tuple) -> None:
    """``t`` of one of ``allowed`` dtypes: no silent cast (float to int16, int64 to uint8)."""
    if t is not None and t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} must be {names}, got {t.dtype}")


def check_scale_values(op: str, scale: torch.Tensor, quantize: bool) -> None:
    """Scales finite and > 0 (quantize ops: 1/scale finite too, the kernels multiply by it); CPU
    tensors by numpy's min and max (one thread), the masks only naming a bad value."""
    check_float_input(op, scale, "scale")
    if scale.numel() == 0 or scale.device.type == "meta":
        return
    s = scale.detach().float()
    a, lib = (s.numpy(), np) if (cpu := s.device.type == "cpu") else (s, torch)
    with np.errstate(all="ignore"):
        one = np.float32(1.0) if cpu else 1.0  # NaN fails both compares; 1/x decreases
        if cpu and (lo := a.min()) > 0 and a.max() <= np.finfo(a.dtype).max and (
                not quantize or np.isfinite(one / lo)):
            return
        ok = lib.isfinite(a) & (a > 0) & (lib.isfinite(one / a) if quantize else True)
    if not bool(ok.all()):
        bad = float(a[~ok].reshape(-1)[0])
        raise ValueError(f"{op}: scale must be finite and > 0{' with 1/scale finite' * quantize}"
                         f", got {bad!r}")


def check_zero_point_input(op: str, zp: torch.Tensor | None, lo: int, hi: int) -> None:
    """An integer zero point within [lo, hi], checked on the given values (an int64 2**40
    no longer wraps to 0 in the int32 conversion first)."""
    check_dtype(op, zp, "zero_point", _INT_DTYPES)
    if zp is not None and zp.numel() and zp.device.type != "meta":
        z = zp.detach().numpy() if zp.device.type == "cpu" else zp
        zmin, zmax = int(z.min()), int(z.max())
        if zmin < lo or zmax > hi:
            raise ValueError(f"{op}: zero_point must lie in the code range [{lo}, {hi}], got "
                             f"values in [{zmin}, {zmax}]")


def check_deadzone_half(op: str, deadzone_half: float) -> None:
    if not (math.isfinite(deadzone_half) and deadzone_half >= 0.0):
        raise ValueError(f"{op}: deadzone_half ((w - 1) / 2) must be finite and >= 0, got "
                         f"{deadzone_half!r}")


def check_sign_bit(op: str, sign_bit: int, value_codes: torch.Tensor) -> None:
    """0 (no sign bit) or one bit of a byte, not set in any magnitude code."""
    if sign_bit != 0 and (sign_bit < 0 or sign_bit > 128 or sign_bit & (sign_bit - 1)):
        raise ValueError(f"{op}: sign_bit must be 0 or a power of two up to 128, got {sign_bit}")
    if sign_bit and value_codes.numel() and value_codes.device.type != "meta":
        if bool((value_codes.to(torch.int64) & sign_bit).any()):
            raise ValueError(f"{op}: sign_bit {sign_bit} is set in a value code: codes of "
                             "positive and negative values would collide")


def g711(op: str, t: torch.Tensor) -> None:
    """mulaw / alaw: encoders take int16 PCM, decoders uint8 codes (no cast from others)."""
    check_dtype(op, t, "pcm" if op.endswith("encode") else "codes",
                (torch.int16,) if op.endswith("encode") else (torch.uint8,))


def check_rule(rule: int, allowed: tuple[int, ...], what: str) -> None:
    if rule not in allowed:
        raise ValueError(f"{what}: unknown scale rule id {rule}")


def check_codebook(values: torch.Tensor, value_codes: torch.Tensor) -> int:
    """1..256 strictly ascending float values with one code each; returns their count."""
    n = values.numel()
    if not 1 <= n <= 256:
        raise ValueError("codebook must have 1..256 values")
    check_len(value_codes, n, "value_codes")
    if n > 1 and not bool((values[1:] > values[:-1]).all()):
        raise ValueError("codebook values must be strictly ascending")
    return n


def check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def check_unpack(packed: torch.Tensor, bits: int, n: int) -> None:
    check_bits(bits)
    if n < 0:
        raise ValueError("n must be >= 0")
    need = (size_product("unpack_bits", n, bits) + 7) // 8
    if packed.numel() < need:
        raise ValueError(f"packed buffer too short: {packed.numel()} bytes, {n} codes of {bits} "
                         f"bits need {need}")


# ---- the element-wise ops, whole (CPU and CUDA implementations call these) ----------------------

def quantize_affine(x, scale, zero_point, group_size: int, qmin: int, qmax: int,
                    rounding: int, shape: int, deadzone_half: float) -> None:
    """On the tensors as given (before the kernels' dtype conversion)."""
    what = "quantize_affine"
    n = x.numel()
    check_float_input(what, x, "x")
    check_groups(n, group_size, what)
    check_len(scale, n // group_size, "scale")
    if zero_point is not None:
        check_len(zero_point, n // group_size, "zero_point")
    check_rounding(rounding, shape)
    check_code_range(qmin, qmax)
    check_deadzone_half(what, deadzone_half)
    check_scale_values(what, scale, True)
    check_zero_point_input(what, zero_point, qmin, qmax)


def quantize_affine_dynamic(x, group_size: int, qmin: int, qmax: int, rule: int,
                            qpos: float, rounding: int, shape: int, deadzone_half: float) -> None:
    what = "quantize_affine_dynamic"
    check_float_input(what, x, "x")
    check_groups(x.numel(), group_size, what)
    check_rounding(rounding, shape)
    check_code_range(qmin, qmax)
    check_rule(rule, AFFINE_RULES, what)
    check_deadzone_half(what, deadzone_half)
    if rule == _C.SCALE_RULES["absmax"] and not (qpos > 0.0 and math.isfinite(qpos)):
        raise ValueError("qpos must be finite and > 0")


def dynamic_zero_points(n: int, group_size: int, rule: int) -> int:
    """Length of quantize_affine_dynamic's zero-point output: one per group for the min/max
    rule, 0 (an empty tensor, nothing allocated) for the symmetric rules, whose zero point is
    0 by definition."""
    return n // group_size if rule == _C.SCALE_RULES["minmax"] and group_size > 0 else 0


def dequantize_affine(codes, scale, zero_point, group_size: int, is_signed: bool) -> None:
    what = "dequantize_affine"
    n = codes.numel()
    check_dtype(what, codes, "codes", _BYTE_DTYPES)
    check_groups(n, group_size, what)
    check_len(scale, n // group_size, "scale")
    check_scale_values(what, scale, False)
    if zero_point is not None:
        check_len(zero_point, n // group_size, "zero_point")
        check_zero_point_input(what, zero_point, -128 if is_signed else 0,
                               127 if is_signed else 255)


def quantize_codebook(x, scale, values, value_codes, sign_bit: int, group_size: int,
                      rounding: int) -> int:
    """Returns the number of codebook values."""
    what = "quantize_codebook"
    n = x.numel()
    check_float_input(what, x, "x")
    check_groups(n, group_size, what)
    check_len(scale, n // group_size, "scale")
    check_scale_values(what, scale, True)
    check_float_input(what, values, "values")
    check_dtype(what, value_codes, "value_codes", _BYTE_DTYPES)
    nv = check_codebook(values, value_codes)
    check_sign_bit(what, sign_bit, value_codes)
    check_rounding(rounding)
    return nv


def quantize_codebook_dynamic(x, values, value_codes, sign_bit: int, group_size: int, rule: int,
                              max_value: float, rounding: int) -> int:
    """Returns the number of codebook values."""
    what = "quantize_codebook_dynamic"
    n = x.numel()
    check_float_input(what, x, "x")
    check_float_input(what, values, "values")
    check_dtype(what, value_codes, "value_codes", _BYTE_DTYPES)
    check_sign_bit(what, sign_bit, value_codes)
    check_groups(n, group_size, what)
    check_rule(rule, AFFINE_RULES, what)
    if rule == _C.SCALE_RULES["minmax"]:
        raise ValueError("codebook formats have no min/max (zero-point) scale rule")
    if rule == _C.SCALE_RULES["absmax"] and not max_value > 0.0:
        raise ValueError("max_value must be > 0")
    nv = check_codebook(values, value_codes)
    check_rounding(rounding)
    return nv


def dequantize_lut(n: int, scale, lut, group_size: int) -> None:
    check_groups(n, group_size, "dequantize_lut")
    check_len(scale, n // group_size, "scale")
    check_len(lut, 256, "lut")


# ---- packed sizes -------------------------------------------------------------------------------

def w8_packed_nbytes(n: int, k: int) -> int:
    """Bytes of ``pack_w8`` of (n, k) codes: n and k padded to multiples of 16 and 4."""
    return size_product("w8 packed N x K", (n + 15) // 16 * 16, (k + 3) // 4 * 4)


def bits_blocks(k: int) -> int:
    """Blocks of 30 weights per packed row of ``k`` weights (gemm_binary / gemm_ternary)."""
    return (k + 29) // 30


def bits_packed_nbytes(n: int, k: int, ternary: bool) -> int:
    """Bytes of a packed ``(n, k)`` binary / ternary weight: ``n`` rounded up to 8 rows, 4 bytes
    per block of 30 weights and bit plane (binary 1, ternary 2)."""
    planes = 2 if ternary else 1
    return size_product("packed N x K", (n + 7) // 8 * 8, 4 * bits_blocks(k) * planes)


def fwht(x) -> None:
    """qkern::fwht: x float32/bfloat16/float16 (..., n), n a power of two."""
    check_dtype("fwht", x, "x", FLOAT_DTYPES)
    n = x.shape[-1] if x.dim() else 0
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht: the last dimension must be a power of two (1, 2, 4, ...), got "
                         f"shape {tuple(x.shape)}")


# ---- quantized matmuls --------------------------------------------------------------------------

def check_size(op: str, t: torch.Tensor | None, want: int, name: str) -> None:
    if t is not None and t.numel() != want:
        raise ValueError(f"{op}: {name} has {t.numel()} elements, expected {want}")


def check_float_x(op: str, x, K: int) -> None:
    """x floating point (..., K) (gemm_w4, gemm_w23)."""
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be floating point, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{op}: x must be (..., K = {K}), got shape {tuple(x.shape)}")


def check_tiles(op: str, scales, zeros, N: int, K: int, group_size: int) -> None:
    """scales / zeros in pack_weight's tile layout (gemm_w4, gemm_w23)."""
    tiles = tile_shape(N, K, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):  # (N, K/G) would be silently wrong
        if t is not None and tuple(t.shape) != tiles:
            raise ValueError(f"{op}: {name} must be in pack_weight's tile layout {tiles}, "
                             f"got shape {tuple(t.shape)}")


def check_mode(op: str, mode: int) -> None:
    if mode not in (0, 1):
        raise ValueError(f"{op}: mode must be 0 (exact) or 1 (fast), got {mode}")


def gemm_w4(x, packed, scales, zeros, bias, N: int, K: int, group_size: int, mode: int,
            op: str = "gemm_w4") -> None:
    check_float_x(op, x, K)
    if N < 0:
        raise ValueError(f"{op}: N must be >= 0, got {N}")
    check_group(K, group_size, op)
    check_mode(op, mode)
    check_tiles(op, scales, zeros, N, K, group_size)
    if packed.dtype != torch.uint8:
        raise ValueError(f"{op}: packed must be pack_weight's uint8 buffer, got {packed.dtype}")
    check_size(op, packed, size_product(op, padded(N), K) // 2, "packed")
    check_size(op, bias, N, "bias")


def gemm_w23(x, packed, scales, zeros, bias, N: int, K: int, group_size: int, bits: int,
             qmin: int, mode: int) -> None:
    op = "gemm_w23"
    check_float_x(op, x, K)
    check_tiles(op, scales, zeros, N, K, group_size)
    if bits not in (2, 3):
        raise ValueError(f"{op}: bits must be 2 or 3, got {bits}")
    if N < 0:
        raise ValueError(f"{op}: N must be >= 0, got {N}")
    check_group(K, group_size, op)
    if qmin != 0 and qmin != -(1 << (bits - 1)):
        raise ValueError(f"{op}: qmin must be 0 (unsigned codes) or {-(1 << (bits - 1))} "
                         f"(signed {bits}-bit), got {qmin}")
    check_mode(op, mode)
    if packed.dtype != torch.uint8:
        raise ValueError(f"{op}: packed must be pack_weight's uint8 buffer, got {packed.dtype}")
    check_size(op, packed, size_product(op, padded(N), K) * bits // 8, "packed")
    check_size(op, bias, N, "bias")


def gemm_lut4(op: str, x, packed, scales, table, bias, N: int, K: int, group_size: int,
              group_error) -> None:
    """gemm_lut4 / gemm_lut4_dq (``scales`` None: double-quantized, checked by the binding);
    ``group_error(K, group_size)``: the device's group rule (``ops.lut4``)."""
    if N < 0 or K <= 0:
        raise ValueError(f"{op}: N must be >= 0 and K > 0, got N = {N}, K = {K}")
    err = group_error(K, group_size)
    if err is not None:
        raise ValueError(f"{op}: {err}")
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"{op}: x must be 2-D (M, K) with K = {K}, got shape "
                         f"{tuple(x.shape)}")
    if table.numel() < 16:
        raise ValueError(f"{op}: table needs 16 values, got {table.numel()}")
    if packed.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"{op}: packed must be uint8 nibbles, got {packed.dtype}")
    size_product(op, x.shape[0], K)
    size_product(op, x.shape[0], N)
    check_size(op, packed, size_product(op, N, K) // 2, "packed")
    check_size(op, scales, N * (K // group_size), "scales")
    check_size(op, bias, N, "bias")


def gemm_lut4_dq(x, packed, qscales, scale2, mean, table, bias, N: int, K: int,
                 group_size: int, dq_group: int, group_error) -> None:
    op = "gemm_lut4_dq"
    gemm_lut4(op, x, packed, None, table, bias, N, K, group_size, group_error)
    if dq_group <= 0:
        raise ValueError(f"{op}: dq_group (blocks per second-level scale) must be positive, "
                         f"got {dq_group}")
    if qscales.dtype != torch.int8:
        raise ValueError(f"{op}: qscales must be int8 codes, got {qscales.dtype}")
    if mean.numel() != 1:
        raise ValueError(f"{op}: mean must hold one value, got {mean.numel()}")
    size_product(op, dq_group)  # int64 in the kernel, (h + 1) * dq_group must not overflow
    blocks = N * (K // group_size)
    check_size(op, qscales, blocks, "qscales (one int8 code per block)")
    check_size(op, scale2, (blocks + dq_group - 1) // dq_group,
               "scale2 (one per dq_group blocks)")


def gemm_fp8(x, w, scales, bias, N: int, K: int, group_size: int, fmt: int) -> None:
    """group_size 0: one scale per row."""
    op = "gemm_fp8"
    if N < 0 or K <= 0:
        raise ValueError(f"{op}: N must be >= 0 and K > 0, got N = {N}, K = {K}")
    if fmt not in (0, 1):
        raise ValueError(f"{op}: fmt must be 0 (fp8_e4m3) or 1 (fp8_e5m2), got {fmt}")
    g = K if group_size == 0 else group_size
    if group_size != 0:
        if group_size <= 0 or group_size % 16:
            raise ValueError(f"{op}: group_size must be 0 (per channel) or a positive multiple "
                             f"of 16, got {group_size}")
        if K % group_size:
            raise ValueError(f"{op}: group_size {group_size} does not divide K = {K}")
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"{op}: x must be 2-D (M, K) with K = {K}")
    if w.dtype != torch.uint8:
        raise ValueError(f"{op}: w must be uint8 FP8 codes, got {w.dtype}")
    size_product(op, x.shape[0], K)
    size_product(op, x.shape[0], N)
    check_size(op, w, size_product(op, N, K), "w (N * K codes)")
    check_size(op, scales, N * (K // g),
               "scales (one per row)" if group_size == 0 else "scales (N * K / G)")
    check_size(op, bias, N, "bias")


def gemm_w8(op: str, x, packed_w, w_scale, bias, N: int, K: int) -> None:
    """gemm_w8a8 / gemm_w8a16."""
    nbytes = w8_packed_nbytes(N, K)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    if N < 0 or K < 0:
        raise ValueError(f"{op}: N and K must be >= 0, got N = {N}, K = {K}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{op}: x must have shape (..., K={K}), got {tuple(x.shape)}")
    if packed_w.dtype != torch.int8 or packed_w.numel() != nbytes:
        raise ValueError(f"{op}: packed_w must be the int8 pack_w8 output for N={N}, K={K} "
                         f"({nbytes} bytes), got {packed_w.dtype} with {packed_w.numel()} "
                         "elements")
    if w_scale.numel() != N:
        raise ValueError(f"{op}: w_scale must have N={N} elements, got {w_scale.numel()}")
    if bias is not None and bias.numel() != N:
        raise ValueError(f"{op}: bias must have N={N} elements, got {bias.numel()}")


# ---- magnitude bound of the int8-activation paths (docs/numerics.md, "Overflow bound") --------
# W8A8's float(acc) * sx is at most 128 K max|x| and the int4 / int2 / int3 fast modes' group
# partial sum at most 15 G max|x|: with max|x| * length <= 2^120 neither overflows float32.
INT8_ACT_BOUND = 2.0**120


def int8_act_bound(op: str, amax: float, length: int, what: str) -> None:
    """ValueError when ``amax * length`` (``length`` = K for W8A8, the group size for the fast
    modes) exceeds 2^120; NaN / Inf ``amax`` pass (the kernels report them)."""
    if math.isfinite(amax) and amax * length > INT8_ACT_BOUND:
        raise ValueError(
            f"{op}: max|x| = {amax:.6g} with {what} = {length} exceeds the int8-activation "
            f"bound max|x| * {what} <= 2^120 ({INT8_ACT_BOUND / length:.6g} here): its float32 "
            "intermediates would overflow (docs/numerics.md, \"Overflow bound\"); use float "
            "activations (w8a16, mode='exact') for such inputs")


def int8_act_bound_x(op: str, x: torch.Tensor, length: int, what: str) -> None:
    """``int8_act_bound`` with ``max|x|`` of a real tensor (in C++ for contiguous float32 on the
    CPU: a torch reduction costs more than a decode step's GEMV takes to read x)."""
    if x.numel() and length > 0:
        fast = x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
        amax = _C.absmax_f32_raw(x.data_ptr(), x.numel()) if fast else float(x.abs().amax())
        int8_act_bound(op, amax, length, what)


def threshold_tensor(op: str, threshold) -> None:
    """The outlier threshold of gemm_w8a8_mixed: a 1-element floating-point tensor (its value
    is checked where it is set, QuantLinear, and by the CPU op)."""
    if (not isinstance(threshold, torch.Tensor) or threshold.numel() != 1
            or not threshold.is_floating_point()):
        what = (f"{threshold.dtype} of shape {tuple(threshold.shape)}"
                if isinstance(threshold, torch.Tensor) else type(threshold).__name__)
        raise ValueError(f"{op}: threshold must be a 1-element float tensor, got {what}")


def w8_codes(codes: torch.Tensor) -> None:
    if codes.dim() != 2 or codes.dtype != torch.int8:
        raise ValueError(f"codes must be a 2-D int8 tensor (N, K), got {codes.dtype} "
                         f"of shape {tuple(codes.shape)}")


def gemm_s8s8(xq, packed_w, N: int, K: int) -> None:
    nbytes = w8_packed_nbytes(N, K)
    if xq.dtype != torch.int8 or xq.dim() < 1 or xq.shape[-1] != K:
        raise ValueError(f"xq must be int8 codes of shape (..., K={K}), got {xq.dtype} "
                         f"{tuple(xq.shape)}")
    if packed_w.dtype != torch.int8 or packed_w.numel() != nbytes:
        raise ValueError(f"packed_w must be the int8 pack_w8 output for N={N}, K={K}")


def gemm_bits(op: str, x, w, alpha, bias, n: int, k: int) -> None:
    """gemm_binary / gemm_ternary."""
    nbytes = bits_packed_nbytes(n, k, op == "gemm_ternary")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{op}: x must be (..., K={k}), got {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise ValueError(f"{op}: x must be float32, got {x.dtype}")
    if w.dtype != torch.uint8:
        raise ValueError(f"{op}: packed weight must be uint8, got {w.dtype}")
    if w.numel() != nbytes:
        raise ValueError(f"{op}: packed weight has {w.numel()} bytes, expected {nbytes} "
                         f"(pack it with pack_{op[5:]})")
    if alpha.numel() != n:
        raise ValueError(f"{op}: alpha must have N={n} elements, got {alpha.numel()}")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"{op}: bias must have N={n} elements, got {bias.numel()}")
