"""PACT (Choi et al., "PACT: Parameterized Clipping Activation for Quantized Neural Networks",
2018): activations clipped to ``[0, alpha]`` with ``alpha`` an ``nn.Parameter`` trained with
the network, then quantized to ``k`` bits on the grid ``alpha / (2^k - 1)``:

    y = clip(x, 0, alpha),   y_q = round(y * (2^k - 1) / alpha) * alpha / (2^k - 1)

with the straight-through estimator for ``round``: ``d y_q / d x = 1`` on ``[0, alpha)``, 0
elsewhere, and ``d y_q / d alpha = 1`` where ``x >= alpha``, 0 elsewhere (the paper's eq. 3).
:meth:`PACTQuant.regularization` is the paper's L2 term ``lambda * alpha^2`` for the loss."""

from __future__ import annotations

import torch
from torch import nn

from ...observers.lsq import ste_round
from .base import Deployed, FakeQuant

__all__ = ["PACTQuant"]


class PACTQuant(FakeQuant):
    """Unsigned ``bits``-bit activations with a learned clip ``alpha`` (per tensor)."""

    KIND = "pact"
    LEARNED = (("alpha", "clip alpha"),)

    def __init__(self, bits: int, alpha: float | None = None, weight_decay: float = 1e-4,
                 name: str = ""):
        """``alpha``: the initial clip (None: the first batch's max, at least 1e-3)."""
        super().__init__(bits, False, None, name)
        self.alpha = nn.Parameter(torch.tensor(1.0 if alpha is None else float(alpha)))
        self.weight_decay = weight_decay
        if alpha is not None:
            self.initialized.fill_(True)

    def _scale(self) -> torch.Tensor:
        return self.alpha / self.q_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            with torch.no_grad():
                self.alpha.fill_(max(float(x.detach().float().max()), 1e-3))
            self.initialized.fill_(True)
        self.check_positive(self.alpha, "clip alpha")
        a = self.alpha.to(x.dtype)
        y = torch.where(x >= a, a, x.clamp(min=0))  # gradients: alpha where x >= alpha
        s = self._scale().detach()
        return y + ((ste_round(y.detach().float() * s.reciprocal()) * s).to(x.dtype)
                    - y).detach()

    def deploy(self) -> Deployed:
        if not bool(self.initialized):
            raise ValueError(f"{self.where()}: its clip is set by the first training batch; "
                             "train the prepared model before convert()")
        self.check_positive(self.alpha, "clip alpha")
        return Deployed(self.format.name, self._scale().detach().clone(), None, None)

    def regularization(self) -> torch.Tensor:
        return self.weight_decay * self.alpha.square()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha={float(self.alpha):.4g}"
