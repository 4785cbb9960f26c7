"""qkern::gemm_w23: matmul with 2-bit or 3-bit group-wise weights (docs/numerics.md, "2-bit
and 3-bit group-wise matmul").

``y = x @ W^T (+ bias)`` with ``W[n, k] = float(q[n, k] - z[n, g]) * s[n, g]``, ``g = k // G``
(exactly ``qkern.dequantize``), codes ``q`` of int2 ([-2, 1]), int3 ([-4, 3]), uint2 ([0, 3])
or uint3 ([0, 7]), zero points ``z`` in the same range (``z = 0``: symmetric), float32 scales.
Float32 ``zeros`` are instead float zero points of the stored code ``u = q - qmin`` (HQQ's
``uint{2,3}`` codes): ``W[n, k] = (float(u) - z) * s``, each operation rounded to float32.

- ``mode=0`` ("exact"): per group an FMA chain of ``x * float(q - z)`` (exact operands), times
  the scale, accumulated over the groups in float32;
- ``mode=1`` ("fast"): activations quantized on the fly per block of 32 along K to int8
  (``scale = amax / 127``, round-nearest-even, as ``gemm_w4``'s fast mode), exact integer dot
  products, float32 accumulation per block and group; NaN/Inf in x raise ``NonFiniteError``
  (the exact mode propagates them per IEEE).

Both modes give identical bits on the scalar and AVX2 paths and on any thread count.

Layout (``pack_weight``): the stored codes are ``u = q - qmin`` (``qmin`` = -2, -4 or 0); rows
in tiles of 8 (N padded with ``u = 0``), K in blocks of 32; tile ``t``, block ``b`` is
``32 * bits`` bytes: ``bits`` vectors of one little-endian 32-bit word per row (exactly ``bits``
bits per weight), codes placed so that shifts and masks give four consecutive codes per byte
(csrc/cpu/gemm/w23/api.h has the bit map). Scales and zero points are stored per tile and group as
8 consecutive values: ``(N_pad // 8, K // G, 8)``.
"""

from __future__ import annotations

import torch

from .. import _C
from . import checks
from .cpu import NonFiniteError
from .raw import contig, ptr
from .schemas import LIB
from .tiles import (
    check_int_codes,
    check_scales_zeros,
    from_tiles,
    padded,
    parse_mode,
    split_zeros,
    to_tiles,
    zeros_dtype,
)

__all__ = ["gemm_w23", "pack_weight", "run_gemm_w23", "unpack_weight"]


def _gemm_w23_cpu(x, packed, scales, zeros, bias, N, K, group_size, bits, qmin, mode):
    checks.gemm_w23(x, packed, scales, zeros, bias, N, K, group_size, bits, qmin, mode)
    x, packed, scales = contig(x, torch.float32), packed.contiguous(), contig(scales, torch.float32)
    (zeros, zeros_f), bias = split_zeros(zeros), contig(bias, torch.float32)
    return run_gemm_w23(x, packed, scales, zeros, zeros_f, bias, N, K, group_size, bits, qmin,
                        mode)


def run_gemm_w23(x, packed, scales, zeros, zeros_f, bias, N, K, group_size, bits, qmin, mode):
    """The CPU body of ``gemm_w23`` on checked, contiguous arguments (as ``run_gemm_w4``)."""
    if mode == 1:
        checks.int8_act_bound_x("gemm_w23", x, group_size, "group_size")
    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32)
    bad = _C.gemm_w23_raw(ptr(x), x.numel() // K, ptr(packed), ptr(scales), ptr(zeros),
                          ptr(bias), N, K, group_size, bits, qmin, mode, ptr(y), ptr(zeros_f))
    if bad:
        raise NonFiniteError("gemm_w23: x contains NaN or Inf (the fast mode quantizes x to "
                             "int8; use mode=0 (exact) to propagate them)")
    return y


LIB.impl("gemm_w23", _gemm_w23_cpu, "CPU")


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of the int{bits} / uint{bits} formats."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def pack_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                group_size: int = 128, bits: int = 2, signed: bool | None = None) -> dict:
    """Packs 2-bit or 3-bit codes (N, K), float scales (N, K // G) and optional int zero points
    (N, K // G) for ``gemm_w23``. ``signed`` (default: ``codes.dtype != torch.uint8``, as in
    QTensor) picks int{bits} codes (``[-2^(bits-1), 2^(bits-1) - 1]``) or uint{bits} codes
    (``[0, 2^bits - 1]``); int zero points lie in the same range (float32 ones are zero points
    of ``u = q - qmin``, any finite value). Returns ``{"packed": uint8
    (N_pad // 8, K // 32, 32 * bits), "scales": float32 (N_pad // 8, K // G, 8), "zeros": int32
    like scales or None, "N", "K", "group_size", "bits", "qmin"}``."""
    if bits not in (2, 3):
        raise ValueError(f"bits must be 2 or 3, got {bits!r}")
    n, k = check_int_codes(codes, group_size)
    if signed is None:
        signed = codes.dtype != torch.uint8
    qmin, qmax = code_range(bits, signed)
    name = f"{'' if signed else 'u'}int{bits}"
    c = codes.detach().cpu()
    if c.numel() and (int(c.min()) < qmin or int(c.max()) > qmax):
        raise ValueError(f"{name} codes must be in [{qmin}, {qmax}], got "
                         f"[{int(c.min())}, {int(c.max())}]")
    check_scales_zeros(scales, zeros, n, k // group_size, qmin, qmax, f"zero points of {name}")
    u = (c.to(torch.int32) - qmin).to(torch.uint8).contiguous()
    packed = torch.from_numpy(_C.pack_w23(u.numpy(), bits, group_size))
    return {
        "packed": packed.view(padded(n) // 8, k // 32, 32 * bits),
        "scales": to_tiles(scales.detach().cpu().to(torch.float32), n),
        "zeros": None if zeros is None else to_tiles(zeros_dtype(zeros.detach().cpu()), n),
        "N": n,
        "K": k,
        "group_size": group_size,
        "bits": bits,
        "qmin": qmin,
    }


def unpack_weight(w: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of ``pack_weight``: (codes (N, K): int8 when signed, uint8 when not; scales
    (N, K // G); zeros or None)."""
    n, k, qmin = w["N"], w["K"], w["qmin"]
    u = torch.from_numpy(_C.unpack_w23(w["packed"].contiguous().numpy(), n, k, w["bits"]))
    codes = (u.to(torch.int32) + qmin).to(torch.int8 if qmin < 0 else torch.uint8)
    zeros = None if w["zeros"] is None else from_tiles(w["zeros"], n)
    return codes, from_tiles(w["scales"], n), zeros


def gemm_w23(x: torch.Tensor, w: dict, bias: torch.Tensor | None = None,
             mode: str | int = "exact") -> torch.Tensor:
    """``x (..., K) @ W^T (+ bias)`` -> float32 (..., N) for ``w = pack_weight(...)``;
    ``mode``: "exact" (0) or "fast" (1). x may be float32, bfloat16 or float16."""
    return torch.ops.qkern.gemm_w23(x, w["packed"], w["scales"], w["zeros"], bias, w["N"],
                                    w["K"], w["group_size"], w["bits"], w["qmin"],
                                    parse_mode(mode))
