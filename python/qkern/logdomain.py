"""Logarithmic quantization with any base, and the log-domain matmul (LNS multiply-accumulate).

A ``bits``-bit log code has the layout of the ``log2_<bits>`` formats (formats.py): the top bit
is the sign, the low ``bits - 1`` bits an index ``i``; ``i = 0`` is zero and ``i >= 1`` the
magnitude ``base^(i - kmax)`` (``kmax = 2^(bits-1) - 1``: exponents ``1 - kmax .. 0``), times
the scale. :func:`log_quantize` takes the scale from the absolute maximum (per tensor, or per
row) so that the largest value gets exponent 0, and rounds each value to the nearest
representable magnitude (in the linear domain, like qkern's codebook formats: for base 2 the
codes are those of ``qkern.quantize(x, "log2_<bits>", scale=...)``, negative zero included).

In the log domain a product is the sum of two exponents: :func:`log_matmul` computes
``out[m, n] = xs[m] ws[n] sum_k sign base^(e_x[m, k] + e_w[n, k])`` on qkern's C++ kernel
(csrc/cpu/logmm: scalar + AVX2) for ``base = 2^(1 / 2^f)`` (f = 0..6: 2, sqrt 2, 2^(1/4), ...),
where the exponent sum splits into a shift and an f-bit fraction looked up in a table;
:func:`log_matmul_reference` is the float64 definition for any base.

>>> import torch
>>> from qkern.logdomain import log_quantize, log_matmul, log_matmul_reference
>>> x, w = torch.randn(4, 16), torch.randn(3, 16)
>>> xq = log_quantize(x, 5, base=2 ** 0.5, per_row=True)
>>> wq = log_quantize(w, 5, base=2 ** 0.5, per_row=True)
>>> y = log_matmul(xq, wq)
>>> bool(torch.allclose(y, log_matmul_reference(xq, wq).float(), rtol=1e-4, atol=1e-4))
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _C

__all__ = ["LogTensor", "frac_bits_of", "log_dequantize", "log_matmul", "log_matmul_reference",
           "log_quantize"]


@dataclass(frozen=True)
class LogTensor:
    """Log codes (uint8, sign-magnitude) with their scale (() per tensor or (rows,))."""

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    base: float

    @property
    def kmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def exponents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(exponent int64, sign +-1 float64, nonzero bool) of every code."""
        sb = 2 ** (self.bits - 1)
        c = self.codes.to(torch.int64)
        idx = c & (sb - 1)
        sign = torch.where(c & sb != 0, -1.0, 1.0).double()
        return idx - self.kmax, sign, idx != 0


def _check_bits_base(bits, base) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"log_quantize: bits must be an int in [2, 8], got {bits!r}")
    if (not isinstance(base, (int, float)) or isinstance(base, bool) or not math.isfinite(base)
            or base <= 1.0):
        raise ValueError(f"log_quantize: base must be a finite number > 1, got {base!r}")


def log_quantize(x: torch.Tensor, bits: int, base: float = 2.0, *, per_row: bool = False,
                 scale: torch.Tensor | None = None) -> LogTensor:
    """``x`` as ``bits``-bit log codes of ``base``; ``per_row``: one scale per row of a 2-D
    ``x`` (else one per tensor); ``scale``: given scales instead of the absolute maximum."""
    _check_bits_base(bits, base)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("log_quantize: x must be a floating-point torch.Tensor")
    if per_row and x.dim() != 2:
        raise ValueError(f"log_quantize: per_row needs a 2-D x, got shape {tuple(x.shape)}")
    xd = x.detach().double()
    if not bool(torch.isfinite(xd).all()):
        raise ValueError("log_quantize: x holds NaN or Inf")
    if scale is None:
        amax = xd.abs().amax(1) if per_row else xd.abs().max()
        scale = torch.where(amax > 0, amax, torch.ones_like(amax)).float()
    scale = torch.as_tensor(scale, dtype=torch.float32)
    kmax = 2 ** (bits - 1) - 1
    mags = torch.tensor([0.0] + [float(base) ** (i - kmax) for i in range(1, kmax + 1)],
                        dtype=torch.float64)
    mids = (mags[1:] + mags[:-1]) / 2
    s = scale.double()[:, None] if per_row else scale.double()
    idx = torch.bucketize(xd.abs() / s, mids)  # nearest magnitude (ties to the smaller)
    codes = idx | torch.where(xd < 0, 2 ** (bits - 1), 0)
    return LogTensor(codes.to(torch.uint8), scale, bits, float(base))


def log_dequantize(q: LogTensor) -> torch.Tensor:
    """The float32 values of ``q``."""
    e, sign, nz = q.exponents()
    v = torch.where(nz, sign * torch.pow(torch.tensor(q.base, dtype=torch.float64), e.double()),
                    torch.zeros((), dtype=torch.float64))
    s = q.scale.double()
    return (v * (s[:, None] if s.dim() == 1 and v.dim() == 2 else s)).float()


def _row_scales(q: LogTensor, rows: int, what: str) -> torch.Tensor:
    if q.codes.dim() != 2:
        raise ValueError(f"log_matmul: {what} must be 2-D codes, got shape "
                         f"{tuple(q.codes.shape)}")
    s = q.scale.float().reshape(-1)
    if s.numel() == 1:
        s = s.expand(rows)
    if s.numel() != rows:
        raise ValueError(f"log_matmul: {what} has {s.numel()} scales for {rows} rows")
    return s.contiguous()


def frac_bits_of(base: float) -> int | None:
    """f with ``base == 2^(1 / 2^f)`` (0 <= f <= 6), None for any other base."""
    for f in range(7):
        if abs(2.0 ** (2.0**-f) - base) <= 1e-12 * base:
            return f
    return None


def log_matmul_reference(xq: LogTensor, wq: LogTensor) -> torch.Tensor:
    """float64 ``out[m, n] = xs[m] ws[n] sum_k sign base^(e_x + e_w)`` (the definition, for any
    base; x (M, K) and w (N, K) codes)."""
    _same(xq, wq)
    ex, sx, nx = xq.exponents()
    ew, sw, nw = wq.exponents()
    b = torch.tensor(xq.base, dtype=torch.float64)
    vx = torch.where(nx, sx * torch.pow(b, ex.double()), 0.0)
    vw = torch.where(nw, sw * torch.pow(b, ew.double()), 0.0)
    acc = vx @ vw.T  # sum_k sx sw b^ex b^ew = sum_k sign b^(ex + ew)
    xs = _row_scales(xq, ex.shape[0], "x").double()
    ws = _row_scales(wq, ew.shape[0], "w").double()
    return acc * xs[:, None] * ws[None, :]


def _same(xq: LogTensor, wq: LogTensor) -> None:
    if not (isinstance(xq, LogTensor) and isinstance(wq, LogTensor)):
        raise TypeError("log_matmul: x and w must be LogTensors (from log_quantize)")
    if xq.base != wq.base:
        raise ValueError(f"log_matmul: x and w need the same base, got {xq.base} and {wq.base}")
    if xq.codes.dim() != 2 or wq.codes.dim() != 2 or xq.codes.shape[1] != wq.codes.shape[1]:
        raise ValueError(f"log_matmul: x (M, K) and w (N, K) codes needed, got "
                         f"{tuple(xq.codes.shape)} and {tuple(wq.codes.shape)}")


def log_matmul(xq: LogTensor, wq: LogTensor) -> torch.Tensor:
    """float32 (M, N) log-domain product of x (M, K) and w (N, K) codes on the C++ kernel;
    the base must be ``2^(1 / 2^f)``, f = 0..6 (other bases: :func:`log_matmul_reference`)."""
    _same(xq, wq)
    f = frac_bits_of(xq.base)
    if f is None:
        raise ValueError(f"log_matmul: the kernel takes bases 2^(1/2^f), f = 0..6 (2, sqrt 2, "
                         f"2^(1/4), ...), got {xq.base}; use log_matmul_reference")
    for what, q in (("x", xq), ("w", wq)):
        if q.codes.dtype != torch.uint8 or q.codes.device.type != "cpu":
            raise TypeError(f"log_matmul: {what} codes must be a CPU uint8 tensor, got "
                            f"{q.codes.dtype} on {q.codes.device}")
    (m, k), n = xq.codes.shape, wq.codes.shape[0]
    xc, wc = xq.codes.contiguous(), wq.codes.contiguous()
    xs, ws = _row_scales(xq, m, "x"), _row_scales(wq, n, "w")
    out = torch.empty((m, n), dtype=torch.float32)
    _C.logmm_raw(xc.data_ptr(), wc.data_ptr(), xs.data_ptr(), ws.data_ptr(), out.data_ptr(),
                 m, n, k, xq.bits, wq.bits, f)
    return out
