"""LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020): the scale is a parameter
trained with the network."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops import fake_quant  # noqa: F401  (registers qkern::lsq_fake_quantize)
from .base import Observer, sanitize_scale

_FLT_MAX = torch.finfo(torch.float32).max


class LSQObserver(Observer):
    """Learnable step size ``s`` (``self.scale``, an nn.Parameter; per channel with granularity
    ``"channel"``); with ``symmetric=False`` also LSQ+'s learned offset ``beta``
    (``self.offset``, initialised with the step size by the least-squares range search
    :func:`mse_range` on the first batch). Symmetric: the first observed batch initializes it to
    ``2 * mean|x| / sqrt(Q_P)`` (in
    float64, capped at FLT_MAX, where float32 overflows on finite data); after
    that ``forward`` only counts batches and ``fake_quantize`` trains it:

        v_hat = round(clamp(v / s, -Q_N, Q_P)) * s

    with the straight-through estimator for ``round`` and the gradient of ``s`` scaled by
    ``g = 1 / sqrt(N * Q_P)`` (N = elements per scale), so
    ``d v_hat / d s = g * (round(v/s) - v/s)`` inside the range and ``g * -Q_N`` / ``g * Q_P``
    below / above it. ``Q_N = -qmin``, ``Q_P = qmax`` of the (symmetric) integer format; ``v / s``
    is computed as ``v * (1/s)`` like qkern's kernels, so the forward values equal
    ``qkern.quantize(v, fmt, scale=s)`` dequantized."""

    def __init__(self, fmt="int8", **kw):
        super().__init__(fmt, **kw)
        if self.format.kind != "int":
            raise ValueError(f"LSQObserver needs an integer format, got {self.format.name}")
        self.q_n, self.q_p = -self.format.qmin, self.format.qmax
        self.scale = nn.Parameter(torch.ones(()))
        # LSQ+ (Bhalgat et al. 2020) when asymmetric: a learned offset beta, MSE initialisation
        self.offset = None if self.symmetric else nn.Parameter(torch.zeros(()))

    def _observe(self, rows: torch.Tensor) -> None:
        if int(self.num_batches) == 0 and self.offset is not None:
            sb = [mse_range(r, self.q_n, self.q_p) for r in rows]
            s = sanitize_scale(torch.stack([v[0] for v in sb]))
            b = torch.stack([v[1] for v in sb]).float()
            self.scale.data = s.reshape(()) if self.granularity == "tensor" else s
            self.offset.data = b.reshape(()) if self.granularity == "tensor" else b
            return
        if int(self.num_batches) == 0:
            init = 2.0 * rows.abs().mean(dim=1) / math.sqrt(self.q_p)
            bad = ~torch.isfinite(init)  # a float32 sum or 2 * mean beyond FLT_MAX: float64
            if bool(bad.any()):
                init64 = 2.0 * rows.double().abs().mean(dim=1) / math.sqrt(self.q_p)
                init = torch.where(bad, init64.clamp(max=_FLT_MAX).float(), init)
            init = sanitize_scale(init)
            self.scale.data = init.reshape(()) if self.granularity == "tensor" else init

    def _range(self):
        s = self.scale.detach().reshape(-1)
        if self.offset is not None:
            b = self.offset.detach().reshape(-1)
            return b - self.q_n * s, b + self.q_p * s
        lo = -self.q_p * s if self.format.signed else torch.zeros_like(s)
        return lo, self.q_p * s

    def calculate_qparams(self):
        """``(scale, None)``; LSQ+ (asymmetric): ``(scale, zero_point)`` with the integer
        zero point nearest to the learned offset, ``zp = clamp(rne(-beta / s))`` (qkern's grids
        have integer zero points: ``x_hat = (q - zp) s``)."""
        self._check_seen()
        s = sanitize_scale(self.scale.detach().cpu().float()).clone()
        if self.offset is None:
            return s, None
        zp = torch.round(-self.offset.detach().cpu().float() / s)
        return s, zp.clamp(self.format.qmin, self.format.qmax).to(torch.int32)

    def _reset_stats(self) -> None:
        self.scale.data = torch.ones(())
        if self.offset is not None:
            self.offset.data = torch.zeros(())

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ's quantize -> dequantize with gradients for ``x`` (STE) and ``self.scale``;
        initializes the scale from ``x`` if nothing was observed yet."""
        if int(self.num_batches) == 0:
            self(x)
        axis = self.axis % x.dim() if self.granularity == "channel" else None
        return lsq_fake_quantize(x, self.scale, self.q_n, self.q_p, axis=axis,
                                 offset=self.offset)


def grad_scaled(p: torch.Tensor, g: float) -> torch.Tensor:
    """``p``'s value with its gradient multiplied by ``g`` (LSQ's gradient scale)."""
    pg = p * g
    return p.detach() + (pg - pg.detach())


def ste_round(t: torch.Tensor) -> torch.Tensor:
    """``round(t)`` (half to even, as qkern's kernels) with the gradient of the identity."""
    return (t.round() - t).detach() + t


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, q_n: int, q_p: int,
                      axis: int | None = None, offset: torch.Tensor | None = None,
                      kernel: bool = True) -> torch.Tensor:
    """LSQ (Esser et al. 2020) and LSQ+ (Bhalgat et al. 2020, with ``offset`` beta):

        v_hat = round(clamp((v - beta) / s, -Q_N, Q_P)) * s + beta

    with the straight-through estimator for ``round`` and the gradients of ``s`` and ``beta``
    scaled by ``g = 1 / sqrt(N * Q_P)`` (N = elements per scale). ``scale`` (and ``offset``)
    are 0-d, or 1-d along ``axis`` of ``x``. ``(v - beta) / s`` is computed as
    ``(v - beta) * (1 / s)``, as qkern's kernels do, so the values equal
    ``qkern.quantize(v - beta, fmt, scale=s)`` dequantized, plus beta.

    float32 CPU tensors go through the fused kernel ``qkern::lsq_fake_quantize``
    (ops/fake_quant.py: one pass forward, one pass backward, the same values and masks; the
    gradients equal this formula's up to float rounding); other dtypes and devices (float64,
    CUDA, bfloat16 ...) through the torch formula below; ``kernel=False`` always takes the
    formula (the reference the kernel is measured against: tests, bench/fake_quant.py)."""
    if axis is None:
        n_per, shape = x.numel(), []
    else:
        n_per = x.numel() // max(x.shape[axis], 1)
        shape = [1] * x.dim()
        shape[axis] = x.shape[axis]
    g = 1.0 / math.sqrt(max(n_per, 1) * q_p)
    if kernel and _fused(x, scale, offset):
        return torch.ops.qkern.lsq_fake_quantize(x, scale, offset, axis, q_n, q_p, g)
    s = grad_scaled(scale, g).reshape(shape)
    v = x.float()
    b = None
    if offset is not None:
        b = grad_scaled(offset, g).reshape(shape)
        v = v - b
    q = ste_round((v * s.reciprocal()).clamp(-q_n, q_p))
    out = q * s
    if b is not None:
        out = out + b
    return out.to(x.dtype)


def _fused(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether the fused CPU kernel takes these tensors: all float32 on the CPU."""
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu")
               for t in (x, *params))


def mse_range(x: torch.Tensor, q_n: int, q_p: int, steps: int = 100
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, offset)`` of the ``[lo, hi]`` range with the least squared error of
    ``round(clamp((x - offset) / scale, -Q_N, Q_P)) * scale + offset`` over ``x``, among
    ``hi = lo + r (max - min)``, ``lo = min * r`` (r = 1/steps ... 1): the range shrinks
    toward the data's low end, where a ReLU/Swish-like activation has most of its mass."""
    v = x.detach().float().reshape(-1)
    lo0, hi0 = v.min(), v.max()
    span = (hi0 - lo0).clamp(min=1e-12)
    best, best_err = None, math.inf
    for i in range(1, steps + 1):
        r = i / steps
        lo = lo0 * r if q_n == 0 else lo0
        s = (span * r) / (q_p + q_n)
        b = lo + q_n * s  # code -Q_N sits at lo
        q = ((v - b) * s.reciprocal()).clamp(-q_n, q_p).round() * s + b
        err = float((q - v).square().mean())
        if err < best_err:
            best, best_err = (s, b), err
    return best
