"""Trained Ternary Quantization (Zhu et al., "Trained Ternary Quantization", ICLR 2017): each
layer's weight becomes ``W_p`` where ``w > delta``, ``-W_n`` where ``w < -delta``, 0 otherwise,
``delta = t * max|w|`` (``t = 0.05``), with the two scales ``W_p``, ``W_n`` (> 0)
``nn.Parameter`` s trained with the network. Gradients (the paper's eqs. 7-8):

- latent weights: ``W_p * g`` where ``w > delta``, ``g`` in the zero region, ``W_n * g`` where
  ``w < -delta`` (``g`` the gradient of the ternary weight);
- ``d/dW_p = sum of g over the positive region``; ``d/dW_n = -sum of g over the negative
  region`` (the negative weights are ``-W_n``; the paper writes eq. 7 for the signed value,
  its reference code differentiates ``-W_n``, as here).

The region membership does not change with a positive rescaling of ``w``, so the paper's
normalisation of ``w`` to ``[-1, 1]`` is left out. ``W_p`` / ``W_n`` start as the mean ``|w|``
of their region of the float weight. Deploy: ``{-W_n, 0, W_p}`` as the sum of two layers on
qkern's ternary kernel (``W_p * {0, 1}`` and ``W_n * {-1, 0}``, one scale per layer each), or
one ternary layer when ``W_p == W_n``."""

from __future__ import annotations

import torch
from torch import nn

from .base import Deployed, FakeQuant

__all__ = ["TTQQuant"]


class _TTQFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, wp, wn, delta):
        pos, neg = w > delta, w < -delta
        ctx.save_for_backward(pos, neg, wp, wn)
        return torch.where(pos, wp.to(w.dtype), torch.where(neg, -wn.to(w.dtype),
                                                            torch.zeros((), dtype=w.dtype)))

    @staticmethod
    def backward(ctx, g):
        pos, neg, wp, wn = ctx.saved_tensors
        gw = g * torch.where(pos, wp.to(g.dtype), torch.where(neg, wn.to(g.dtype),
                                                              torch.ones((), dtype=g.dtype)))
        gp = (g * pos).sum().reshape(wp.shape).to(wp.dtype)
        gn = -(g * neg).sum().reshape(wn.shape).to(wn.dtype)
        return gw, gp, gn, None


class TTQQuant(FakeQuant):
    """Ternary weights ``{-W_n, 0, W_p}`` with learned per-layer scales."""

    KIND = "ttq"
    LEARNED = (("w_p", "W_p"), ("w_n", "W_n"))

    def __init__(self, init: torch.Tensor, threshold: float = 0.05, name: str = ""):
        super().__init__(2, True, None, name)
        self.threshold = threshold
        w = init.detach().float()
        d = threshold * w.abs().max()
        mp = w[w > d].mean() if bool((w > d).any()) else w.abs().max()
        mn = (-w[w < -d]).mean() if bool((w < -d).any()) else w.abs().max()
        self.w_p = nn.Parameter(mp.clamp(min=1e-8).reshape(()).clone())
        self.w_n = nn.Parameter(mn.clamp(min=1e-8).reshape(()).clone())
        self.initialized.fill_(True)

    def delta(self, w: torch.Tensor) -> torch.Tensor:
        return self.threshold * w.detach().abs().max()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.check_positive(self.w_p, "W_p")
        self.check_positive(self.w_n, "W_n")
        return _TTQFn.apply(w, self.w_p, self.w_n, self.delta(w))

    def deploy_weight(self, w: torch.Tensor) -> Deployed:
        self.check_positive(self.w_p, "W_p")
        self.check_positive(self.w_n, "W_n")
        wd = w.detach().float()
        d = self.delta(wd)
        wp, wn = self.w_p.detach().float(), self.w_n.detach().float()
        rows = torch.ones(w.shape[0])
        if bool(wp == wn):
            v = torch.where(wd > d, wp, torch.where(wd < -d, -wn, torch.zeros(())))
            return Deployed("ternary", rows * wp, None, 0, weight=v)
        pos = torch.where(wd > d, wp, torch.zeros(()))
        neg = torch.where(wd < -d, -wn, torch.zeros(()))
        parts = [Deployed("ternary", rows * wp, None, 0, weight=pos),
                 Deployed("ternary", rows * wn, None, 0, weight=neg)]
        return Deployed("ternary", rows * wp, None, 0, parts=parts)

    def extra_repr(self) -> str:
        return (f"ternary, threshold={self.threshold}, W_p={float(self.w_p):.4g}, "
                f"W_n={float(self.w_n):.4g}")

