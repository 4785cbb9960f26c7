"""A pure-Python (arbitrary-precision int) reference of gemmlowp's fixedpoint.h and TFLite's
quantization_util / common.h, written from the published definitions, element by element
(no numpy: no silent int overflow)."""

from __future__ import annotations

import math

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _trunc_div(n: int, d: int) -> int:
    """C++ integer division (rounds toward zero), d > 0."""
    q = abs(n) // d
    return q if n >= 0 else -q


def srdhm(a: int, b: int) -> int:
    """gemmlowp SaturatingRoundingDoublingHighMul(int32 a, int32 b)."""
    overflow = a == b == INT32_MIN
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else (1 - (1 << 30))
    hi = _trunc_div(ab + nudge, 1 << 31)
    return INT32_MAX if overflow else hi


def rdbpot(x: int, exponent: int) -> int:
    """gemmlowp RoundingDivideByPOT(int32 x, exponent): mask, remainder, threshold."""
    assert 0 <= exponent <= 31
    mask = (1 << exponent) - 1
    remainder = x & mask  # the low bits of the two's complement
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def sat32(v: int) -> int:
    return max(INT32_MIN, min(INT32_MAX, v))


def mbqm(x: int, m0: int, shift: int) -> int:
    """TFLite MultiplyByQuantizedMultiplier (double rounding), x * 2^left saturating."""
    left, right = max(shift, 0), max(-shift, 0)
    return rdbpot(srdhm(sat32(x * (1 << left)), m0), right)


def requantize(x: int, m0: int, shift: int, zp: int, qmin: int, qmax: int) -> int:
    return max(qmin, min(qmax, mbqm(x, m0, shift) + zp))


def quantize_multiplier(m: float) -> tuple[int, int]:
    """TFLite QuantizeMultiplier: frexp, round(q * 2^31) (std::round: half away from zero)."""
    if m == 0.0:
        return 0, 0
    q, shift = math.frexp(m)
    v = q * (1 << 31)
    q_fixed = int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))
    assert q_fixed <= 1 << 31
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift, q_fixed = 0, 0
    return q_fixed, shift
