"""LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020) and LSQ+ (Bhalgat et al.,
"LSQ+: Improving low-bit quantization through learnable offsets and better initialization",
CVPR-W 2020): the step size ``s`` (and LSQ+'s offset ``beta``) are ``nn.Parameter`` s trained
with the network, their gradients scaled by ``g = 1 / sqrt(N * Q_P)``
(:func:`qkern.observers.lsq.lsq_fake_quantize`).

Initialisation: LSQ ``s = 2 mean|v| / sqrt(Q_P)`` (the paper; ``init_mode="max"``:
``max|v| / Q_P``, round-to-nearest's scale, the usual start for LLM QAT; ``"mse"``: the clip
``r max|v|`` with the least squared error, :func:`mse_scale`); LSQ+ weights
``s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)`` (the paper's eq. 8), LSQ+ activations
``beta, s`` minimising the mean squared quantization error of the first batch (the paper's
MSE initialisation: a search over clipping ranges ``[min, min + r (max - min)]``).
A per-tensor activation quantizer's parameters exist from ``prepare`` on (so an optimizer
made afterwards holds them) and are filled in place by the first batch."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...observers.lsq import lsq_fake_quantize, mse_range
from .base import Deployed, FakeQuant

__all__ = ["LSQPlusQuant", "LSQQuant", "mse_range", "mse_scale"]

#: the clipping ratios ``mse_scale`` tries: r * max|v| for r in 0.30 .. 1.00
_RATIOS = torch.linspace(0.3, 1.0, 71)


def mse_scale(v: torch.Tensor, per_axis, q_n: int, q_p: int) -> torch.Tensor:
    """Per slice (``per_axis`` as FakeQuant's), the step ``s = r max|v| / Q_P`` over the ratios
    ``r`` in 0.30, 0.31 .. 1.00 with the least ``sum (round(clamp(v / s, -Q_N, Q_P)) s - v)^2``
    (ties: the larger ``r``); one step per slice, shape (slices,)."""
    rows = per_axis(v, lambda t, *d: t.reshape(t.shape[0], -1) if d else t.reshape(1, -1))
    amax = rows.abs().amax(1).clamp(min=1e-8)
    best_s, best_e = amax / q_p, torch.full_like(amax, math.inf)
    for r in _RATIOS.flip(0).tolist():
        s = (r * amax / q_p).unsqueeze(1)
        e = ((rows * s.reciprocal()).clamp(-q_n, q_p).round() * s - rows).square().sum(1)
        better = e < best_e
        best_s = torch.where(better, s.squeeze(1), best_s)
        best_e = torch.where(better, e, best_e)
    return best_s


class LSQQuant(FakeQuant):
    """LSQ: learned step size, symmetric grid (signed, or unsigned from zero)."""

    KIND = "lsq"
    LEARNED = (("scale", "scale"),)

    def __init__(self, bits: int, signed: bool | None = True, axis: int | None = None,
                 init: torch.Tensor | None = None, name: str = "", init_mode: str = "paper",
                 group_size: int | None = None):
        super().__init__(bits, signed, axis, name, group_size)
        # "paper": 2 mean|v| / sqrt(Q_P); "max": max|v| / Q_P; "mse": the least-squares clip
        self.init_mode = init_mode
        v = None if init is None else self.grouped(init)
        n = 1 if v is None or axis is None else v.shape[axis]
        self.scale = nn.Parameter(torch.ones(() if axis is None else (n,)))
        if v is not None:
            self.init_from(v)

    def init_from(self, v: torch.Tensor) -> None:
        self.resolve_sign(v)
        a = v.detach().float().abs()
        if self.init_mode == "max":  # round-to-nearest's scale: no clipping
            s = (self.per_axis(a, lambda t, *d: t.amax(*d)) / self.q_p).clamp(min=1e-8)
        elif self.init_mode == "mse":  # the clip of max|v| with the least squared error
            s = mse_scale(v.detach().float(), self.per_axis, self.q_n, self.q_p)
        else:
            m = self.per_axis(a, lambda t, *d: t.mean(*d))
            s = (2.0 * m / math.sqrt(self.q_p)).clamp(min=1e-8)
        with torch.no_grad():
            self.scale.data = s.reshape(self.scale.shape).clone()
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.grouped(x)
        if not bool(self.initialized):
            self.init_from(v)
        self.check_positive(self.scale)
        ax = None if self.axis is None else self.axis % v.dim()
        return lsq_fake_quantize(v, self.scale, self.q_n, self.q_p, axis=ax).reshape(x.shape)

    def deploy(self) -> Deployed:
        if not bool(self.initialized):
            raise ValueError(f"{self.where()}: its step size is set by the first training "
                             "batch; train the prepared model before convert()")
        self.check_positive(self.scale)
        return Deployed(self.format.name, self.scale.detach().clone(), None, self.axis)


class LSQPlusQuant(LSQQuant):
    """LSQ+: LSQ plus a learned offset ``beta`` (asymmetric activations; weights keep
    ``beta = 0`` and the paper's mean / std initialisation)."""

    KIND = "lsq+"

    def __init__(self, bits: int, signed: bool | None = True, axis: int | None = None,
                 init: torch.Tensor | None = None, offset: bool = True, name: str = "",
                 group_size: int | None = None):
        self.learn_offset = offset
        super().__init__(bits, signed, axis, init, name, group_size=group_size)
        if offset:
            self.offset = nn.Parameter(torch.zeros(()))

    def init_from(self, v: torch.Tensor) -> None:
        self.resolve_sign(v)
        x = v.detach().float()
        with torch.no_grad():
            if self.learn_offset:  # activations: MSE over clipping ranges
                s, b = mse_range(x, self.q_n, self.q_p)
                self.scale.data = s.reshape(self.scale.shape).clone()
                self.offset.data = b.reshape(()).clone()
            else:  # weights: the paper's mean / std rule, per slice
                mu = self.per_axis(x, lambda t, *d: t.mean(*d))
                sd = self.per_axis(x, lambda t, *d: t.std(*d))
                m = torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs())
                s = (m / 2 ** (self.bits - 1)).clamp(min=1e-8)
                self.scale.data = s.reshape(self.scale.shape).clone()
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.learn_offset:
            return super().forward(x)
        if not bool(self.initialized):
            self.init_from(x)
        self.check_positive(self.scale)
        ax = None if self.axis is None else self.axis % x.dim()
        return lsq_fake_quantize(x, self.scale, self.q_n, self.q_p, axis=ax,
                                 offset=self.offset)

    def deploy(self) -> Deployed:
        d = super().deploy()
        if self.learn_offset:
            d.offset = self.offset.detach().clone()
        return d
