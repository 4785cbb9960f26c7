"""``qkern::requantize``: an int32 accumulator to int8 (or int32) with integers only,
``clamp(MultiplyByQuantizedMultiplier(acc, m0, shift) + zero_point, qmin, qmax)``: TFLite's
fixed-point multiplier (gemmlowp SaturatingRoundingDoublingHighMul + RoundingDivideByPOT, the
rule in csrc/cpu/fixedpoint/api.h; docs/integer_only.md), per tensor (``multiplier`` and
``shift`` of one element) or per channel along the last dimension of ``acc``. ``qmin`` /
``qmax`` fold a ReLU (``qmin = zero_point``). No autograd: an integer op."""

from __future__ import annotations

import torch

from .. import _C
from . import fp_checks
from .raw import contig, ptr
from .schemas import LIB

__all__ = ["requantize"]


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor,
               zero_point: int, qmin: int, qmax: int, out_bits: int) -> torch.Tensor:
    per_channel = fp_checks.requantize(acc, multiplier, shift, zero_point, qmin, qmax, out_bits)
    a = contig(acc, torch.int32)
    m, s = contig(multiplier, torch.int32).reshape(-1), contig(shift, torch.int32).reshape(-1)
    out = torch.empty(acc.shape, dtype=fp_checks.OUT_DTYPES[out_bits])
    channels = acc.shape[-1] if acc.dim() else 1
    rows = acc.numel() // channels if channels else 0
    _C.requantize_raw(ptr(a), rows, channels, ptr(m), ptr(s), per_channel, zero_point, qmin,
                      qmax, ptr(out), out_bits)
    return out


LIB.impl("requantize", requantize, "CPU")
