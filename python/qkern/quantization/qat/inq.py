"""Incremental Network Quantization (Zhou et al., "Incremental Network Quantization: Towards
Lossless CNNs with Low-Precision Weights", ICLR 2017): the weights become powers of two (or
zero) a part at a time. Each layer's grid is ``P = {0, +-2^n2, ..., +-2^n1}`` with
``n1 = floor(log2(4 s / 3))``, ``s = max|W|`` of the float weight, ``n2 = n1 + 1 - 2^(b-1) / 2``
(``b`` bits, one of them for zero); a weight becomes ``beta sgn(w)`` where
``(alpha + beta) / 2 <= |w| < 3 beta / 2`` (alpha, beta adjacent in P, i.e. the nearest
element of P), 0 below ``2^(n2 - 1)``; weights that grew past ``3 * 2^n1 / 2`` while
retraining get ``2^n1`` (the paper's rule would zero them).

The schedule (``QATConfig.inq_schedule``, the paper's 50 / 75 / 87.5 / 100 %): the training
loop calls :func:`inq_step` between phases. Each call fixes the next part of every layer's
weights, the largest magnitudes among those not yet fixed, to their power of two (written
into the weight parameter too); the fixed part no longer trains (its gradient is masked), the
rest is retrained in the next phase. ``convert`` refuses a model whose schedule is not at
100 %. Deploy: qkern's ``log2_b`` format (sign + exponent + zero) with the scale ``2^n1``:
the paper's ``2^(b-2)`` magnitudes are a subset of its ``2^(b-1) - 1``, so it is exact."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Deployed, FakeQuant, refuse_converted

__all__ = ["INQQuant", "inq_step", "pow2_quantize"]

SCHEDULE = (0.5, 0.75, 0.875, 1.0)


def pow2_quantize(w: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """The nearest element of ``{0, +-2^n2, ..., +-2^n1}`` (INQ's eq. 4)."""
    a = w.detach().float().abs()
    e = torch.floor(torch.log2(a.clamp(min=1e-38) * (4.0 / 3.0))).clamp(max=n1)
    e = torch.where(e < n2, torch.full_like(e, n2), e)
    mag = torch.where(a >= 2.0 ** (n2 - 1), torch.exp2(e), torch.zeros_like(a))
    return torch.sign(w.detach().float()) * mag


class INQQuant(FakeQuant):
    """Power-of-two weights fixed incrementally; ``forward`` is ``where(fixed, P(w), w)``."""

    KIND = "inq"

    def __init__(self, bits: int, init: torch.Tensor, schedule=SCHEDULE, name: str = ""):
        super().__init__(bits, True, None, name)
        self.schedule = tuple(float(f) for f in schedule)
        s = float(init.detach().float().abs().max())
        self.n1 = math.floor(math.log2(4 * s / 3)) if s > 0 else 0
        self.n2 = self.n1 + 1 - 2 ** (bits - 1) // 2
        self.register_buffer("fixed", torch.zeros(init.shape, dtype=torch.bool))
        self.register_buffer("values", torch.zeros(init.shape))
        self.register_buffer("phase", torch.zeros((), dtype=torch.long))  # steps taken
        self.initialized.fill_(True)

    @property
    def fraction(self) -> float:
        """The part of the weights fixed so far (0 before the first :func:`inq_step`)."""
        p = int(self.phase)
        return 0.0 if p == 0 else self.schedule[p - 1]

    def step(self, weight: nn.Parameter) -> float:
        """Fix the next part of ``weight`` (largest magnitudes first); returns the fraction."""
        p = int(self.phase)
        if p >= len(self.schedule):
            raise ValueError(f"{self.where()}: the INQ schedule {self.schedule} is complete "
                             "(100 % of the weights fixed); convert() the model")
        with torch.no_grad():
            w = weight.detach().float()
            n = w.numel()
            target = n if p == len(self.schedule) - 1 else round(self.schedule[p] * n)
            todo = target - int(self.fixed.sum())
            if todo > 0:
                mag = w.abs().reshape(-1).masked_fill(self.fixed.reshape(-1), -1.0)
                idx = torch.topk(mag, todo).indices
                self.fixed.view(-1)[idx] = True
                self.values.view(-1)[idx] = pow2_quantize(w.reshape(-1)[idx], self.n1, self.n2)
            weight.data[self.fixed] = self.values[self.fixed].to(weight.dtype)
        self.phase.fill_(p + 1)
        return self.fraction

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.where(self.fixed, self.values.to(w.dtype), w)  # no gradient where fixed

    def check_ready(self) -> None:
        if int(self.phase) < len(self.schedule):
            raise ValueError(f"{self.where()}: the INQ schedule is at {100 * self.fraction:g} % "
                             f"of the weights fixed (step {int(self.phase)} of "
                             f"{len(self.schedule)}); call qkern.quantization.inq_step(model) "
                             "after each retraining phase until 100 %, then convert()")

    def deploy_weight(self, w: torch.Tensor) -> Deployed:
        self.check_ready()
        rows = torch.full((w.shape[0],), 2.0 ** self.n1)
        return Deployed(f"log2_{self.bits}", rows, None, 0, weight=self.values.clone())

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, grid 2^{self.n2}..2^{self.n1} and 0, "
                f"fixed {100 * self.fraction:g} %")


def inq_step(model: nn.Module) -> float:
    """Advance INQ's schedule by one phase in every INQ layer of ``model`` (prepared with
    ``QATConfig(method="inq")``): call it before the first retraining phase and after each
    one; ``convert`` needs the last step (100 %). Returns the fraction now fixed."""
    refuse_converted(model, "inq_step")
    done = None
    for mod in model.modules():
        q = getattr(mod, "weight_fake", None)
        if isinstance(q, INQQuant):
            done = q.step(mod.weight)
    if done is None:
        raise ValueError("inq_step: the model has no INQ layer; prepare it with "
                         "QATConfig(method='inq') first")
    return done
