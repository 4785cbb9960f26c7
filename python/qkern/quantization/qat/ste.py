"""Plain fake quantization with the straight-through estimator (Bengio et al. 2013; Jacob et
al. 2018): the scale follows the data (weights: max |w| of each slice at every step;
activations: an exponential moving average of the batch's max |x| while training, frozen in
eval) and gets no gradient; ``round`` passes the gradient unchanged inside the clipping range
and zero outside it."""

from __future__ import annotations

import torch

from ...observers.lsq import lsq_fake_quantize
from .base import Deployed, FakeQuant

__all__ = ["STEQuant"]


class STEQuant(FakeQuant):
    """Symmetric (signed) or zero-based (unsigned) grid with ``scale = max / Q_P``."""

    KIND = "ste"

    def __init__(self, bits: int, signed: bool | None = True, axis: int | None = None,
                 momentum: float | None = 0.1, name: str = "", group_size: int | None = None):
        """``momentum``: the moving average's weight of a new batch (activations); None: the
        current tensor's max at every call (weights)."""
        super().__init__(bits, signed, axis, name, group_size)
        self.momentum = momentum
        self.register_buffer("running_max", torch.zeros(()))

    def _batch_max(self, x: torch.Tensor) -> torch.Tensor:
        return self.per_axis(x.detach().float().abs(), lambda t, *d: t.amax(*d))

    def _scale(self) -> torch.Tensor:
        return (self.running_max / self.q_p).clamp(min=torch.finfo(torch.float32).tiny)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, x = x.shape, self.grouped(x)
        self.resolve_sign(x)
        if self.momentum is None or self.training or not bool(self.initialized):
            m = self._batch_max(x)
            if self.momentum is None or not bool(self.initialized):
                self.running_max = m.clone()
                self.initialized.fill_(True)
            else:
                self.running_max.mul_(1 - self.momentum).add_(self.momentum * m)
        ax = None if self.axis is None else self.axis % x.dim()
        return lsq_fake_quantize(x, self._scale(), self.q_n, self.q_p, axis=ax).reshape(shape)

    def deploy(self) -> Deployed:
        if not bool(self.initialized):
            raise ValueError(f"{self.where()}: no batch seen; train (or run a batch through) "
                             "the prepared model before convert()")
        return Deployed(self.format.name, self._scale().detach().clone(), None, self.axis)
