"""Argument checks of ``qkern::requantize`` (ops/fixedpoint.py), shared by its fake (meta)
kernel in ``schemas.py`` and its CPU kernel. Each raises ValueError or TypeError naming the op
and the problem."""

from __future__ import annotations

import torch

from .checks import check_dtype

OP = "requantize"
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
OUT_DTYPES = {8: torch.int8, 32: torch.int32}


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor,
               zero_point: int, qmin: int, qmax: int, out_bits: int) -> bool:
    """acc int32 of any shape (channels = its last dimension; a 0-d acc is one channel),
    multiplier and shift int32 with 1 element (per tensor) or ``channels`` (per channel),
    out_bits 8 (int8 result) or 32 (int32), ``qmin <= qmax`` inside that type, zero_point an
    int32. The shift values (in [-31, 30]) are checked by the kernel. Returns per_channel."""
    check_dtype(OP, acc, "acc", (torch.int32,))
    check_dtype(OP, multiplier, "multiplier", (torch.int32,))
    check_dtype(OP, shift, "shift", (torch.int32,))
    if out_bits not in OUT_DTYPES:
        raise ValueError(f"{OP}: out_bits must be 8 or 32, got {out_bits}")
    lo, hi = (-128, 127) if out_bits == 8 else (INT32_MIN, INT32_MAX)
    if not lo <= qmin <= qmax <= hi:
        raise ValueError(f"{OP}: need {lo} <= qmin <= qmax <= {hi}, got qmin={qmin}, "
                         f"qmax={qmax}")
    if not INT32_MIN <= zero_point <= INT32_MAX:
        raise ValueError(f"{OP}: zero_point must fit int32, got {zero_point}")
    channels = acc.shape[-1] if acc.dim() else 1
    if multiplier.numel() != shift.numel():
        raise ValueError(f"{OP}: multiplier and shift must have the same length, got "
                         f"{multiplier.numel()} and {shift.numel()}")
    if multiplier.numel() not in (1, channels):
        raise ValueError(f"{OP}: multiplier / shift need 1 value (per tensor) or one per channel "
                         f"(the last dimension of acc, {channels}), got {multiplier.numel()}")
    return multiplier.numel() != 1 or channels == 1
