"""DoReFa-Net (Zhou et al., "DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks
with Low Bitwidth Gradients", 2016), with ``quantize_k(r) = round((2^k - 1) r) / (2^k - 1)``
and the straight-through estimator for ``round``:

- weights (eq. 9): ``w_k = 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1`` (max over the
  layer); the gradient flows through ``tanh`` and the max. The values are the odd multiples of
  ``1 / (2^k - 1)``: qkern's ``int{k}`` *midrise* grid ``(q + 1/2) s`` with ``s = 2 / (2^k - 1)``
  (no zero level), so ``forward`` computes them in that form and ``deploy`` is exact;
- activations (eq. 10 after the paper's bounded activation): ``quantize_k(clip(x, 0, 1))``,
  gradient 1 on ``[0, 1]`` and 0 outside: ``uint{k}`` with the scale ``1 / (2^k - 1)``;
- gradients (eq. 12, optional): the gradient ``dr`` reaching a layer's output becomes
  ``2 m [quantize_k(dr / (2 m) + 1/2 + N(k)) - 1/2]`` with ``m = max|dr|`` per sample and the
  paper's uniform noise ``N(k) = sigma / (2^k - 1)``, ``sigma ~ U(-1/2, 1/2)`` (``noise=True``:
  stochastic rounding, unbiased, ``E[dr_k] = dr``), or rounded deterministically
  (``noise=False``)."""

from __future__ import annotations

import torch
from torch import nn

from ... import formats as QF
from ...layout import Layout
from ...observers.lsq import lsq_fake_quantize, ste_round
from ...tensor import QTensor
from .base import Deployed, FakeQuant

__all__ = ["DoReFaActQuant", "DoReFaGradQuant", "DoReFaWeightQuant", "dorefa_quantize_grad",
           "midrise_qtensor"]


class DoReFaWeightQuant(FakeQuant):
    """``bits``-bit DoReFa weights (one normalisation per layer)."""

    KIND = "dorefa"

    def __init__(self, bits: int, name: str = ""):
        super().__init__(bits, True, None, name)
        self.initialized.fill_(True)

    @property
    def step(self) -> float:
        """The midrise step ``2 / (2^k - 1)`` (float32)."""
        return float(torch.tensor(2.0 / (2 ** self.bits - 1), dtype=torch.float32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(w.float())
        r = t / (2 * t.abs().max().clamp(min=torch.finfo(torch.float32).tiny)) + 0.5
        n = ste_round(r * (2 ** self.bits - 1))  # quantize_k: n / (2^k - 1), n in 0..2^k-1
        # 2 n / (2^k - 1) - 1 = (n - 2^(k-1) + 1/2) * 2 / (2^k - 1): the midrise code form
        return ((n - 2 ** (self.bits - 1) + 0.5) * self.step).to(w.dtype)

    def deploy_weight(self, w: torch.Tensor) -> Deployed:
        with torch.no_grad():
            v = self.forward(w.detach()).float()
        s = torch.full((w.shape[0],), self.step)
        return Deployed(f"int{self.bits}", s, None, 0, weight=v, quantizer="midrise")


def midrise_qtensor(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> QTensor:
    """The (out, in) ``weight`` whose rows lie on the midrise grid ``(q + 1/2) scale[row]``,
    ``q`` in ``int{bits}``, as a ``uint{bits}`` QTensor with one group per row and the float
    zero point ``z = 2^(bits-1) - 1/2``: ``(u - z) s`` with ``u = q + 2^(bits-1)``, the same
    values, in the form the fused int2/3/4 kernels take (their HQQ path: float zero points of
    unsigned codes) instead of the dequant fallback."""
    n, k = weight.shape
    z = 2 ** (bits - 1) - 0.5
    s = scale.float().reshape(n, 1)
    u = torch.round(weight.float() * s.reciprocal() + z)
    if not bool(torch.equal(((u - z) * s), weight.float())) or bool((u < 0).any()) or \
            bool((u > 2 ** bits - 1).any()):
        raise ValueError(f"midrise_qtensor: the weight is not on the int{bits} midrise grid")
    return QTensor(u.to(torch.uint8), s, torch.full((n, 1), z), QF.get(f"uint{bits}"),
                   Layout("group", (n, k), 1, k))


class DoReFaActQuant(FakeQuant):
    """``quantize_k(clip(x, 0, 1))``: unsigned, fixed scale ``1 / (2^k - 1)``."""

    KIND = "dorefa"

    def __init__(self, bits: int, name: str = ""):
        super().__init__(bits, False, None, name)
        self.register_buffer("scale", torch.tensor(1.0 / (2 ** bits - 1)))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lsq_fake_quantize(x, self.scale, 0, self.q_p)  # scale is a buffer: no grad

    def deploy(self) -> Deployed:
        return Deployed(self.format.name, self.scale.clone(), None, None)


def dorefa_quantize_grad(g: torch.Tensor, bits: int, noise: bool = False) -> torch.Tensor:
    """DoReFa's eq. 12: ``2 m [quantize_k(g / (2 m) + 1/2 + N(k)) - 1/2]``, ``m = max|g|``
    over all but the first (batch) dimension; ``N(k) = sigma / (2^k - 1)``, ``sigma ~
    U(-1/2, 1/2)`` when ``noise`` (torch's global generator), else 0."""
    if g.dim() == 0:
        m = g.abs()
    else:
        m = g.abs().reshape(g.shape[0], -1).amax(1).reshape([-1] + [1] * (g.dim() - 1))
    m = m.clamp(min=torch.finfo(torch.float32).tiny)
    levels = 2 ** bits - 1
    r = (g / (2 * m) + 0.5) * levels
    if noise:
        r = r + (torch.rand_like(r) - 0.5)
    return 2 * m * (torch.round(r).clamp(0, levels) / levels - 0.5)


class _GradQuantFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits, noise):
        ctx.bits, ctx.noise = bits, noise
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return dorefa_quantize_grad(g, ctx.bits, ctx.noise), None, None


class DoReFaGradQuant(nn.Module):
    """Identity forward; the gradient of its output is quantized to ``bits`` (eq. 12), with
    the paper's noise when ``noise``."""

    def __init__(self, bits: int, noise: bool = False):
        super().__init__()
        self.bits, self.noise = bits, noise

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return _GradQuantFn.apply(y, self.bits, self.noise)

    def extra_repr(self) -> str:
        return f"grad_bits={self.bits}" + (", noise" if self.noise else "")
