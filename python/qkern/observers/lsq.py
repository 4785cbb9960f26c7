"""LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020): the scale is a parameter
trained with the network."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Observer, sanitize_scale

_FLT_MAX = torch.finfo(torch.float32).max


class LSQObserver(Observer):
    """Learnable step size ``s`` (``self.scale``, an nn.Parameter; per channel with granularity
    ``"channel"``). The first observed batch initializes it to ``2 * mean|x| / sqrt(Q_P)`` (in
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
        if self.format.kind != "int" or not self.symmetric:
            raise ValueError("LSQObserver needs a symmetric integer format, got "
                             f"{self.format.name}, symmetric={self.symmetric}")
        self.q_n, self.q_p = -self.format.qmin, self.format.qmax
        self.scale = nn.Parameter(torch.ones(()))

    def _observe(self, rows: torch.Tensor) -> None:
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
        lo = -self.q_p * s if self.format.signed else torch.zeros_like(s)
        return lo, self.q_p * s

    def calculate_qparams(self):
        self._check_seen()
        return sanitize_scale(self.scale.detach().cpu().float()).clone(), None

    def _reset_stats(self) -> None:
        self.scale.data = torch.ones(())

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ's quantize -> dequantize with gradients for ``x`` (STE) and ``self.scale``;
        initializes the scale from ``x`` if nothing was observed yet."""
        if int(self.num_batches) == 0:
            self(x)
        s = self.scale
        if self.granularity == "channel":
            ax = self.axis % x.dim()
            n_per = x.numel() // x.shape[ax]
            shape = [1] * x.dim()
            shape[ax] = x.shape[ax]
        else:
            n_per, shape = x.numel(), []
        g = 1.0 / math.sqrt(n_per * self.q_p)
        sg = s * g
        s = s.detach() + (sg - sg.detach())  # value exactly s, gradient scaled by g
        s = s.reshape(shape)
        t = (x.float() * s.reciprocal()).clamp(-self.q_n, self.q_p)
        q = (t.round() - t).detach() + t  # straight-through round
        return (q * s).to(x.dtype)
