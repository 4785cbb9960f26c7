"""Tensor streams: compress a tensor along one axis (e.g. a KV cache along time) with delta
coding, closed-loop DPCM or IMA-ADPCM, one stream per position of the other axes, and compare
with plain uniform quantization at the same rate.

- ``compress_stream(x, axis=0, method="dpcm"|"delta"|"adpcm", bits=4, order=2)`` ->
  ``CompressedStream``: ``codes`` (T, C) (ADPCM: (C, T)), float32 side information per
  channel (``side``), ``.decompress()`` (x's type, shape and dtype), ``.bits_per_value``
  (code bits plus 32 bits per side value, over the number of values). DPCM / delta pick each
  channel's step among 8 multiples of the default (``dpcm._default_step``) by the smallest
  squared error; ADPCM maps each channel to int16 by its absmax (one float32 scale).
- ``uniform_baseline(x, axis, bits)`` -> ``(x_hat, bits_per_value)``: ``qkern.quantize`` with
  ``uint{bits}`` per channel (asymmetric min-max over the stream axis).
- ``sqnr(x, x_hat)``: ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB (float64; inf when equal).

>>> import numpy as np
>>> t = np.arange(4096, dtype=np.float32)
>>> x = np.stack([np.sin(t / 50), np.cos(t / 30)], axis=1)      # (T, C): smooth streams
>>> c = compress_stream(x, axis=0, method="dpcm", bits=2, order=2)
>>> xu, bpv = uniform_baseline(x, axis=0, bits=2)
>>> bool(sqnr(x, c.decompress()) > sqnr(x, xu) + 20), round(c.bits_per_value, 3)
(True, 2.023)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..quantize import quantize
from ..tensor import dequantize
from .adpcm import ima_adpcm_decode, ima_adpcm_encode
from .dpcm import DPCMCode, dpcm_decode, dpcm_encode, fit_predictor

__all__ = ["CompressedStream", "compress_stream", "sqnr", "uniform_baseline"]

METHODS = ("dpcm", "delta", "adpcm")
_SEARCH = tuple(2.0 ** (-k / 2) for k in range(8))  # step multiples tried per channel


def _as_2d(x, axis: int, fn: str):
    """x -> (float32 numpy (T, C), was_torch, dtype, shape, axis)."""
    was_torch = isinstance(x, torch.Tensor)
    if was_torch:
        dtype, a = x.dtype, x.detach().cpu().float().numpy()
    elif isinstance(x, np.ndarray):
        dtype, a = x.dtype, x
    else:
        raise TypeError(f"{fn}: x must be a numpy array or torch tensor, got {type(x).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{fn}: x must be a float array, got {a.dtype}")
    if a.ndim == 0:
        raise ValueError(f"{fn}: x must have at least one dimension")
    if not isinstance(axis, (int, np.integer)) or not -a.ndim <= axis < a.ndim:
        raise ValueError(f"{fn}: axis {axis!r} out of range for {a.ndim} dimensions")
    axis = int(axis) % a.ndim
    m = np.moveaxis(a, axis, 0)
    x2 = np.ascontiguousarray(m.reshape(m.shape[0], int(np.prod(m.shape[1:]))), np.float32)
    if not np.isfinite(x2).all():
        raise ValueError(f"{fn}: x contains NaN or Inf")
    return x2, was_torch, dtype, a.shape, axis


def _back(x2: np.ndarray, was_torch: bool, dtype, shape, axis: int):
    moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
    out = np.moveaxis(x2.reshape(moved), 0, axis)
    return torch.from_numpy(np.ascontiguousarray(out)).to(dtype) if was_torch \
        else out.astype(dtype)


@dataclass
class CompressedStream:
    """A tensor compressed along ``axis`` by ``compress_stream``.

    >>> c = compress_stream(torch.ones(16, 3), axis=0, method="adpcm")
    >>> c.codes.shape, round(c.bits_per_value, 3), c.decompress().shape
    ((3, 16), 6.0, torch.Size([16, 3]))
    """

    method: str
    bits: int
    codes: np.ndarray
    side: dict = field(default_factory=dict)
    shape: tuple = ()
    axis: int = 0
    dtype: object = np.float32
    was_torch: bool = False

    @property
    def bits_per_value(self) -> float:
        n = self.codes.size
        side = sum(int(np.asarray(v).size) for v in self.side.values())
        return (self.bits * n + 32 * side) / max(n, 1)

    def decompress_2d(self) -> np.ndarray:
        """The reconstruction as float32 (T, C)."""
        if self.method == "adpcm":
            pcm, _ = ima_adpcm_decode(self.codes, self.codes.shape[1])
            return np.ascontiguousarray((pcm.astype(np.float32) * self.side["scale"][:, None]).T)
        return dpcm_decode(DPCMCode(self.codes, self.side["coef"], self.side["step"], self.bits))

    def decompress(self):
        """The reconstruction with the input's type, shape and dtype."""
        return _back(self.decompress_2d(), self.was_torch, self.dtype, self.shape, self.axis)


def _dpcm_searched(x2: np.ndarray, coef: np.ndarray, bits: int) -> DPCMCode:
    """Closed-loop DPCM with, per channel, the step among _SEARCH x the default step that gives
    the smallest squared error."""
    base = dpcm_encode(x2, coef=coef, bits=bits)
    best_err = np.full(x2.shape[1], np.inf)
    best_step = base.step.copy()
    for f in _SEARCH:
        s = (base.step * np.float32(f)).astype(np.float32)
        err = ((dpcm_encode(x2, coef=coef, bits=bits, step=s).xhat - x2).astype(np.float64) ** 2
               ).sum(axis=0)
        better = err < best_err
        best_err[better], best_step[better] = err[better], s[better]
    return dpcm_encode(x2, coef=coef, bits=bits, step=best_step)


def compress_stream(x, axis: int = 0, method: str = "dpcm", bits: int = 4,
                    order: int = 2) -> CompressedStream:
    """Compress ``x`` along ``axis``: every position of the other axes is one stream."""
    fn = "compress_stream"
    if method not in METHODS:
        raise ValueError(f"{fn}: method must be one of {METHODS}, got {method!r}")
    x2, was_torch, dtype, shape, axis = _as_2d(x, axis, fn)
    if x2.shape[0] == 0:
        raise ValueError(f"{fn}: x has no samples along axis {axis} (shape {shape})")
    meta = {"shape": shape, "axis": axis, "dtype": dtype, "was_torch": was_torch}
    if method == "adpcm":
        if bits != 4:
            raise ValueError(f"{fn}: IMA-ADPCM codes 4 bits per value, got bits={bits!r}")
        scale = (np.abs(x2).max(axis=0) / 32767).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1))
        pcm = np.clip(np.rint(x2 / scale), -32768, 32767).astype(np.int16)
        codes, _ = ima_adpcm_encode(np.ascontiguousarray(pcm.T))
        return CompressedStream("adpcm", 4, codes, {"scale": scale}, **meta)
    if method == "delta":
        coef = np.ones((1, x2.shape[1]), np.float32)
    else:
        if not isinstance(order, int) or not 1 <= order <= 4:
            raise ValueError(f"{fn}: order must be an int in 1..4, got {order!r}")
        coef = (fit_predictor(x2, order) if x2.shape[0] > order
                else np.zeros((order, x2.shape[1]), np.float32))
    code = _dpcm_searched(x2, coef, bits)
    return CompressedStream(method, code.bits, code.codes, {"coef": code.coef, "step": code.step},
                            **meta)


def uniform_baseline(x, axis: int = 0, bits: int = 4):
    """``(x_hat, bits_per_value)`` of plain uniform quantization at ``bits``: ``uint{bits}``,
    one asymmetric min-max scale and zero point per stream (``qkern.quantize``)."""
    x2, was_torch, dtype, shape, axis = _as_2d(x, axis, "uniform_baseline")
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"uniform_baseline: bits must be an int in 1..8, got {bits!r}")
    q = quantize(torch.from_numpy(x2), f"uint{bits}", granularity="channel", axis=1,
                 symmetric=False)
    xh = dequantize(q).numpy()
    return _back(xh, was_torch, dtype, shape, axis), float(q.bits_per_element)


def sqnr(x, x_hat) -> float:
    """Signal to quantization noise ratio in dB: ``10 log10(sum x^2 / sum (x - x_hat)^2)``."""
    a = (x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor)
         else np.asarray(x, np.float64))
    b = (x_hat.detach().cpu().double().numpy() if isinstance(x_hat, torch.Tensor)
         else np.asarray(x_hat, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"sqnr: shapes differ: {a.shape} vs {b.shape}")
    noise = float(((a - b) ** 2).sum())
    return float("inf") if noise == 0 else 10 * np.log10(float((a ** 2).sum()) / noise)
