"""Fixed-point requantization (gemmlowp / TFLite): a real rescale ``M = s_in * s_w / s_out`` as an
int32 multiplier ``m0`` and a power-of-two ``shift``, ``M ~= m0 * 2^(shift - 31)``, applied to
int32 accumulators with integer operations only.

- :func:`requantize_multiplier` is TFLite's ``QuantizeMultiplier``: ``q, shift = frexp(M)``
  (``q`` in [0.5, 1)), ``m0 = round(q * 2^31)`` (half away from zero); ``m0 == 2^31`` becomes
  ``2^30`` with ``shift + 1``; a shift below -31 flushes to ``(0, 0)``; ``M = 0`` is ``(0, 0)``.
- :func:`saturating_rounding_doubling_high_mul` and :func:`rounding_divide_by_pot` are
  gemmlowp's fixedpoint.h ``SaturatingRoundingDoublingHighMul`` and ``RoundingDivideByPOT``.
- :func:`multiply_by_quantized_multiplier` is TFLite's ``MultiplyByQuantizedMultiplier``
  (``RoundingDivideByPOT(SRDHM(x * 2^max(shift, 0), m0), max(-shift, 0))``), on qkern's C++
  kernel (``qkern::requantize``); ``x * 2^left`` saturates to int32 (TFLite leaves that overflow
  undefined).

The tensor functions take int32 torch tensors or numpy arrays (or Python ints) and return the
same kind; the arguments broadcast.

>>> import torch
>>> m0, shift = requantize_multiplier(0.0123)
>>> (m0, shift)
(1690499128, -6)
>>> multiply_by_quantized_multiplier(torch.tensor([1000, -1000], dtype=torch.int32), m0, shift)
tensor([ 12, -12], dtype=torch.int32)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import ops as _ops  # noqa: F401  (registers torch.ops.qkern.requantize)

__all__ = ["INT32_MAX", "INT32_MIN", "multiply_by_quantized_multiplier", "quantize_multipliers",
           "requantize_multiplier", "rounding_divide_by_pot",
           "saturating_rounding_doubling_high_mul"]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def requantize_multiplier(scale: float) -> tuple[int, int]:
    """``(m0, shift)`` with ``scale ~= m0 * 2^(shift - 31)`` (TFLite ``QuantizeMultiplier``):
    ``m0`` in [2^30, 2^31) or 0, ``shift`` in [-31, 30] (positive: a left shift). ``scale``
    must be finite, >= 0 and < 2^30; ValueError otherwise.

    >>> requantize_multiplier(0.5), requantize_multiplier(3.0), requantize_multiplier(0.0)
    ((1073741824, 0), (1610612736, 2), (0, 0))
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    s = float(scale)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"scale must be finite and >= 0, got {scale!r}")
    if s == 0.0:
        return 0, 0
    q, shift = math.frexp(s)
    q_fixed = math.floor(q * 2.0**31 + 0.5)  # exact: q * 2^31 < 2^31 has no fraction bits lost
    if q_fixed == 2**31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        raise ValueError(f"scale must be < 2^30 (a left shift of at most 30), got {scale!r}")
    return int(q_fixed), int(shift)


def quantize_multipliers(scales) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`requantize_multiplier` of every element of ``scales`` (float64 recommended):
    ``(m0, shift)`` int32 tensors of its shape."""
    flat = torch.as_tensor(scales, dtype=torch.float64).reshape(-1).tolist()
    pairs = [requantize_multiplier(s) for s in flat]
    shape = torch.as_tensor(scales).shape
    m0 = torch.tensor([p[0] for p in pairs], dtype=torch.int32).reshape(shape)
    sh = torch.tensor([p[1] for p in pairs], dtype=torch.int32).reshape(shape)
    return m0, sh


def _int32(name: str, v) -> tuple[torch.Tensor, bool]:
    """v as an int32 tensor, and whether it came as numpy."""
    if isinstance(v, np.ndarray):
        if v.dtype != np.int32:
            raise TypeError(f"{name} must be int32, got numpy {v.dtype}")
        return torch.from_numpy(np.ascontiguousarray(v)), True
    if isinstance(v, torch.Tensor):
        if v.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {v.dtype}")
        return v, False
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        if not INT32_MIN <= int(v) <= INT32_MAX:
            raise ValueError(f"{name} must fit int32, got {v}")
        return torch.tensor(int(v), dtype=torch.int32), False
    raise TypeError(f"{name} must be an int32 tensor / array or an int, got {type(v).__name__}")


def _back(t: torch.Tensor, as_numpy: bool):
    return t.numpy() if as_numpy else t


def saturating_rounding_doubling_high_mul(a, b):
    """gemmlowp ``SaturatingRoundingDoublingHighMul``: the high 32 bits of ``2 a b`` rounded
    (nudge ``2^30`` or ``1 - 2^30`` by the sign of ``a b``, division by ``2^31`` truncating);
    ``INT32_MIN * INT32_MIN`` saturates to ``INT32_MAX``.

    >>> saturating_rounding_doubling_high_mul(torch.tensor([2**30, -2**31], dtype=torch.int32),
    ...                                       torch.tensor([2**30, -2**31], dtype=torch.int32))
    tensor([ 536870912, 2147483647], dtype=torch.int32)
    """
    (ta, na), (tb, nb) = _int32("a", a), _int32("b", b)
    ta, tb = torch.broadcast_tensors(ta, tb)
    ab = ta.to(torch.int64) * tb.to(torch.int64)
    nudge = torch.where(ab >= 0, 2**30, 1 - 2**30)
    hi = torch.div(ab + nudge, 2**31, rounding_mode="trunc")
    hi = torch.where((ta == INT32_MIN) & (tb == INT32_MIN), INT32_MAX, hi)
    return _back(hi.to(torch.int32), na or nb)


def rounding_divide_by_pot(x, exponent):
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded to nearest, ties away from
    zero; ``exponent`` (an int or an int32 tensor broadcasting with ``x``) in [0, 31].

    >>> rounding_divide_by_pot(torch.tensor([5, -5, 6, -6], dtype=torch.int32), 2)
    tensor([ 1, -1,  2, -2], dtype=torch.int32)
    """
    (tx, nx), (te, ne) = _int32("x", x), _int32("exponent", exponent)
    if te.numel() and (int(te.min()) < 0 or int(te.max()) > 31):
        raise ValueError("exponent must be in [0, 31]")
    tx, te = torch.broadcast_tensors(tx.to(torch.int64), te.to(torch.int64))
    mask = (1 << te) - 1
    remainder = tx & mask
    threshold = (mask >> 1) + (tx < 0).to(torch.int64)
    out = (tx >> te) + (remainder > threshold).to(torch.int64)
    return _back(out.to(torch.int32), nx or ne)


def multiply_by_quantized_multiplier(x, m0, shift):
    """TFLite ``MultiplyByQuantizedMultiplier(x, m0, shift)`` on int32 (``x * 2^left``
    saturating); ``m0`` and ``shift`` (ints or int32 tensors broadcasting with ``x``), shift in
    [-31, 30]. Runs qkern's C++ kernel (scalar / AVX2 / AVX-512, bit-identical)."""
    (tx, nx), (tm, nm), (ts, ns) = _int32("x", x), _int32("m0", m0), _int32("shift", shift)
    if ts.numel() and (int(ts.min()) < -31 or int(ts.max()) > 30):
        raise ValueError("shift must be in [-31, 30]")
    if tm.numel() == 1 and ts.numel() == 1:
        out = torch.ops.qkern.requantize(tx.reshape(1, -1), tm.reshape(1), ts.reshape(1), 0,
                                         INT32_MIN, INT32_MAX, 32).reshape(tx.shape)
    else:
        tx, tm, ts = torch.broadcast_tensors(tx, tm, ts)
        out = torch.ops.qkern.requantize(tx.reshape(1, -1), tm.reshape(-1), ts.reshape(-1), 0,
                                         INT32_MIN, INT32_MAX, 32).reshape(tx.shape)
    return _back(out, nx or nm or ns)
