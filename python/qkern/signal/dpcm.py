"""Closed-loop DPCM, delta quantization and delta modulation on the C++ coder
(csrc/cpu/signal/api.h gives the exact arithmetic).

A signal is ``x`` of shape (T,) (one stream) or (T, C) (C streams, time along axis 0). Each
sample is predicted from the decoder's previous reconstructions,
``pred = a_1 xh[t-1] + ... + a_p xh[t-p]`` (``xh[t] = 0`` before the start, float32), and the
residual ``x[t] - pred`` is quantized: ``xh[t] = pred + Q(x[t] - pred)``. Because the encoder
tracks the decoder, the reconstruction error is the quantizer's error of that one sample
(at most ``step / 2`` while the residual stays in range): it does not accumulate.

- ``dpcm_encode(x, order=, coef=, bits=, step=, quantizer=)``: predictor order 1..4 with
  coefficients given or fitted by least squares (``fit_predictor``); residual quantizer
  ``"uniform"`` (``bits`` 1..8, step ``step``; codes ``q + 2^(bits-1)``) or ``"mulaw"`` (bits
  2..8: mu-law companding of the residual over ``[-step, step]``, ``mu`` = 255).
- ``delta_encode(x, bits=1, step=)``: ``a_1 = 1``; ``bits=1`` is delta modulation (one bit per
  sample, ``xh[t] = xh[t-1] +- step``), ``bits >= 2`` delta quantization.
- ``dpcm_decode(code)`` / ``delta_decode(code)``: the reconstruction from a ``DPCMCode``.

>>> import numpy as np
>>> x = np.sin(np.arange(6, dtype=np.float32) / 3)
>>> code = delta_encode(x, bits=1, step=0.25)
>>> code.codes.tolist(), delta_decode(code).tolist()
([1, 1, 1, 1, 0, 1], [0.25, 0.5, 0.75, 1.0, 0.75, 1.0])
>>> code = dpcm_encode(x, order=2, bits=4)
>>> bool(np.abs(dpcm_decode(code) - x).max() <= code.step.max() / 2 + 1e-6)
True
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from .. import _C

__all__ = ["DPCMCode", "delta_decode", "delta_encode", "dpcm_decode", "dpcm_encode",
           "fit_predictor"]

QUANTIZERS = {"uniform": 0, "mulaw": 1}


@dataclass
class DPCMCode:
    """What ``dpcm_encode`` / ``delta_encode`` produce: ``codes`` uint8 (x's shape), the
    predictor ``coef`` float32 (order, C), the residual ``step`` float32 (C) (the range for
    ``"mulaw"``), the quantizer, and the encoder's reconstruction ``xhat`` (what
    ``dpcm_decode`` gives back, bit for bit).

    >>> code = dpcm_encode(np.arange(8, dtype=np.float32), coef=[1.0], bits=2, step=1.0)
    >>> code.order, code.codes.tolist(), dpcm_decode(code).tolist()
    (1, [2, 3, 3, 3, 3, 3, 3, 3], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    """

    codes: np.ndarray
    coef: np.ndarray
    step: np.ndarray
    bits: int
    quantizer: str = "uniform"
    mu: float = 255.0
    xhat: np.ndarray | None = None

    @property
    def order(self) -> int:
        return self.coef.shape[0]


def _signal(x, fn: str) -> tuple[np.ndarray, bool]:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{fn}: x must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{fn}: x must be a real number array, got dtype {x.dtype}")
    if x.ndim not in (1, 2):
        raise ValueError(f"{fn}: x must be (T,) or (T, C), got shape {x.shape}")
    one = x.ndim == 1
    x2 = np.ascontiguousarray(x.reshape(-1, 1) if one else x, np.float32)
    if not np.isfinite(x2).all():
        raise ValueError(f"{fn}: x contains NaN or Inf")
    return x2, one


def _check_order(order, fn: str) -> int:
    if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or not 1 <= order <= 4:
        raise ValueError(f"{fn}: order must be an int in 1..4, got {order!r}")
    return int(order)


def _check_bits(bits, quantizer: str, fn: str) -> int:
    if quantizer not in QUANTIZERS:
        raise ValueError(f"{fn}: quantizer must be one of {sorted(QUANTIZERS)}, got {quantizer!r}")
    lo = 2 if quantizer == "mulaw" else 1
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not lo <= bits <= 8:
        raise ValueError(f"{fn}: bits must be an int in {lo}..8 for the {quantizer} quantizer, "
                         f"got {bits!r}")
    return int(bits)


def fit_predictor(x, order: int) -> np.ndarray:
    """Least-squares predictor coefficients, float32 (order, C): per channel the ``a``
    minimizing ``sum_{t >= order} (x[t] - sum_k a_k x[t-k])^2`` (normal equations in float64,
    a 1e-9 relative ridge for constant signals)."""
    x2, _ = _signal(x, "fit_predictor")
    p = _check_order(order, "fit_predictor")
    T, C = x2.shape
    if T <= p:
        raise ValueError(f"fit_predictor: need more than order = {p} samples, got {T}")
    xd = x2.astype(np.float64)
    lags = np.stack([xd[p - k:T - k] for k in range(1, p + 1)], axis=1)  # (T-p, p, C)
    g = np.einsum("tic,tjc->cij", lags, lags)
    b = np.einsum("tic,tc->ci", lags, xd[p:])
    ridge = 1e-9 * (np.trace(g, axis1=1, axis2=2) / p + 1e-30)
    g += ridge[:, None, None] * np.eye(p)
    return np.linalg.solve(g, b[..., None])[..., 0].T.astype(np.float32)


def _default_step(x2: np.ndarray, coef: np.ndarray, bits: int, quantizer: str) -> np.ndarray:
    """From the open-loop residual r: uniform 2 max|r| / (2^bits - 1) (bits >= 2), the mean
    |r| for delta modulation, max|r| (the range) for mu-law."""
    if x2.shape[0] == 0:
        return np.ones(x2.shape[1], np.float32)
    pred = np.zeros_like(x2)
    for k in range(1, coef.shape[0] + 1):
        pred[k:] += coef[k - 1] * x2[:-k]
    r = np.abs(x2 - pred)
    if quantizer == "mulaw":
        s = r.max(axis=0)
    elif bits == 1:
        s = r.mean(axis=0)
    else:
        s = 2 * r.max(axis=0) / (2 ** bits - 1)
    return np.where(s > 0, s, 1.0).astype(np.float32)


def _per_channel(v, name: str, fn: str, shape) -> np.ndarray:
    """v broadcast to shape: a number, (C,) for step; (order,) or (order, C) for coef."""
    a = np.asarray(v, np.float32)
    if a.ndim == 1 and len(shape) == 2:
        a = a[:, None]
    try:
        a = np.ascontiguousarray(np.broadcast_to(a, shape))
    except ValueError as e:
        raise ValueError(f"{fn}: {name} must broadcast to {shape}, got shape {a.shape}") from e
    if not np.isfinite(a).all():
        raise ValueError(f"{fn}: {name} contains NaN or Inf")
    return a


def _run(x2, codes, coef, step, bits, quantizer, mu) -> np.ndarray:
    T, C = codes.shape
    xh = np.empty((T, C), np.float32)
    _C.dpcm_raw(0 if x2 is None else x2.ctypes.data, codes.ctypes.data, xh.ctypes.data, T, C,
                coef.ctypes.data, step.ctypes.data, coef.shape[0], bits, QUANTIZERS[quantizer],
                float(mu))
    return xh


def dpcm_encode(x, order: int = 2, coef=None, bits: int = 4, step=None,
                quantizer: str = "uniform", mu: float = 255.0) -> DPCMCode:
    """Closed-loop DPCM of ``x`` (T,) or (T, C). ``coef``: None (least squares,
    ``fit_predictor``) or (order,) / (order, C); ``step``: None (``_default_step``), a number
    or (C,), positive."""
    fn = "dpcm_encode"
    x2, one = _signal(x, fn)
    bits = _check_bits(bits, quantizer, fn)
    T, C = x2.shape
    if coef is None:
        p = _check_order(order, fn)
        coef = fit_predictor(x2, p) if T > p else np.zeros((p, C), np.float32)
    else:
        c = np.asarray(coef, np.float32)
        p = _check_order(c.shape[0] if c.ndim else 0, fn)
        coef = _per_channel(c, "coef", fn, (p, C))
    step = (_default_step(x2, coef, bits, quantizer) if step is None
            else _per_channel(step, "step", fn, (C,)))
    if not (step > 0).all():
        raise ValueError(f"{fn}: step must be positive, got {step}")
    if not (isinstance(mu, numbers.Real) and not isinstance(mu, bool) and mu > 0):
        raise ValueError(f"{fn}: mu must be a positive number, got {mu!r}")
    codes = np.empty((T, C), np.uint8)
    xh = _run(x2, codes, coef, step, bits, quantizer, mu)
    if one:
        codes, xh = codes[:, 0], xh[:, 0]
    return DPCMCode(codes, coef, step, bits, quantizer, float(mu), xh)


def dpcm_decode(code: DPCMCode) -> np.ndarray:
    """The reconstruction (float32, the codes' shape) of a ``DPCMCode``."""
    if not isinstance(code, DPCMCode):
        raise TypeError(f"dpcm_decode: expected a DPCMCode, got {type(code).__name__}")
    bits = _check_bits(code.bits, code.quantizer, "dpcm_decode")
    c = np.asarray(code.codes)
    if c.dtype != np.uint8 or c.ndim not in (1, 2):
        raise TypeError(f"dpcm_decode: codes must be uint8 (T,) or (T, C), got {c.dtype} {c.shape}")
    one = c.ndim == 1
    c2 = np.ascontiguousarray(c.reshape(-1, 1) if one else c)
    C = c2.shape[1]
    coef = np.asarray(code.coef, np.float32)
    p = _check_order(coef.shape[0] if coef.ndim else 0, "dpcm_decode")
    coef = _per_channel(coef, "coef", "dpcm_decode", (p, C))
    step = _per_channel(code.step, "step", "dpcm_decode", (C,))
    top = 2 ** bits - 1 if bits > 1 else 1
    if c2.size and c2.max() > top:
        raise ValueError(f"dpcm_decode: {bits}-bit codes must lie in 0..{top}, got {c2.max()}")
    xh = _run(None, c2, coef, step, bits, code.quantizer, code.mu)
    return xh[:, 0] if one else xh


def delta_encode(x, bits: int = 1, step=None) -> DPCMCode:
    """Delta modulation (``bits=1``: ``xh[t] = xh[t-1] + step`` when ``x[t] >= xh[t-1]``, else
    ``- step``) or delta quantization (``bits >= 2``: the difference to ``xh[t-1]`` on a
    uniform ``bits``-bit grid of ``step``): DPCM with the fixed predictor ``a_1 = 1``."""
    return dpcm_encode(x, coef=[1.0], bits=bits, step=step)


def delta_decode(code: DPCMCode) -> np.ndarray:
    """The reconstruction of ``delta_encode``'s result (``dpcm_decode``)."""
    return dpcm_decode(code)
