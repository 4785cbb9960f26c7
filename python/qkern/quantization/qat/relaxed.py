"""Relaxed quantization (Louizos, Reisser, Blankevoort, Gavves, Welling, "Relaxed Quantization
for Discretized Neural Networks", ICLR 2019): a differentiable relaxation of rounding.

The input ``x`` gets logistic noise of learned scale ``sigma``; the grid ``g_i = i s``
(``i = -Q_N .. Q_P``, learned step ``s``) splits the line into cells ``(g_i - s/2, g_i + s/2]``,
the outermost open to -inf / +inf (the clamp of rounding), so each grid point has the
probability

    p_i = F((g_i + s/2 - x) / sigma) - F((g_i - s/2 - x) / sigma),   F = sigmoid,

and the p_i sum to 1 (:meth:`RelaxedQuant.cell_probs`). Training samples from the concrete
(Gumbel-softmax) relaxation of that categorical with temperature ``tau``:
``pi = softmax((log p + G) / tau)``, ``x_hat = sum_i pi_i g_i`` (G: Gumbel noise), so the
gradients reach ``x``, ``s`` and ``sigma``; ``hard=True`` is the paper's RQ-ST: the forward
takes the sampled grid point ``g_argmax`` and the backward the concrete sample's gradient.
In eval mode (and after ``convert``) the forward is plain round-to-nearest at the learned step
(the paper's deterministic test-time rounding). The gradients of ``log s`` and ``log sigma``
are scaled by LSQ's ``1 / sqrt(N Q_P)``. As ``sigma -> 0`` the training forward becomes
round-to-nearest too. Cost: one value per grid point per element (2^bits), so keep the bits
low (2..4) on large activations."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...observers.lsq import grad_scaled, lsq_fake_quantize
from .base import Deployed, FakeQuant

__all__ = ["RelaxedQuant"]

_LOGP_FLOOR = 1e-20  # log p of an (almost) impossible cell: log(1e-20) = -46


class RelaxedQuant(FakeQuant):
    """Relaxed quantization with a learned step ``scale`` and noise scale ``sigma`` (both per
    tensor, or per slice along ``axis``, learned as their logarithms ``log_scale`` /
    ``log_sigma``); ``init``: a weight to set them from (else the first
    batch): ``s = max|v| / Q_P``, ``sigma = sigma_ratio * s`` (the paper: 1/3 of the step).

    >>> import torch
    >>> from qkern.quantization.qat import RelaxedQuant
    >>> q = RelaxedQuant(2, True, None, init=torch.tensor([-1.0, 0.4, 1.0]))
    >>> p = q.cell_probs(torch.tensor([0.4])).detach()   # grid -2, -1, 0, 1 (s = 1, sigma = 1/3)
    >>> [round(float(v), 3) for v in p[0]]
    [0.003, 0.06, 0.511, 0.426]
    >>> q.eval()(torch.tensor([0.4, -0.7])).tolist()    # eval: round to nearest
    [0.0, -1.0]
    """

    KIND = "relaxed"
    LEARNED = (("scale", "scale"), ("sigma", "sigma"))

    def __init__(self, bits: int, signed: bool | None = True, axis: int | None = None,
                 init: torch.Tensor | None = None, name: str = "", tau: float = 1.0,
                 hard: bool = False, sigma_ratio: float = 1.0 / 3.0):
        super().__init__(bits, signed, axis, name)
        if not (isinstance(tau, (int, float)) and tau > 0):
            raise ValueError(f"{self.where()}: tau must be a positive number, got {tau!r}")
        if not (isinstance(sigma_ratio, (int, float)) and sigma_ratio > 0):
            raise ValueError(f"{self.where()}: sigma_ratio must be positive, got {sigma_ratio!r}")
        self.tau, self.hard, self.sigma_ratio = float(tau), bool(hard), float(sigma_ratio)
        n = 1 if init is None or axis is None else init.shape[axis]
        shape = () if axis is None else (n,)
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.log_sigma = nn.Parameter(torch.full(shape, -1.0986))
        if init is not None:
            self.init_from(init)

    @property
    def scale(self) -> torch.Tensor:
        """The grid step ``exp(log_scale)`` (learned in the log domain: it stays positive)."""
        return self.log_scale.exp()

    @property
    def sigma(self) -> torch.Tensor:
        """The logistic noise scale ``exp(log_sigma)`` (learned in the log domain)."""
        return self.log_sigma.exp()

    def init_from(self, v: torch.Tensor) -> None:
        self.resolve_sign(v)
        a = v.detach().float().abs()
        s = (self.per_axis(a, lambda t, *d: t.amax(*d)) / self.q_p).clamp(min=1e-8)
        with torch.no_grad():
            self.log_scale.data = s.log().reshape(self.log_scale.shape).clone()
            self.log_sigma.data = (s * self.sigma_ratio).log().reshape(self.log_scale.shape).clone()
        self.initialized.fill_(True)

    def _shaped(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-tensor / per-axis parameter broadcastable against ``x`` (plus a grid dim)."""
        if self.axis is None:
            return t.reshape([1] * (x.dim() + 1))
        shape = [1] * (x.dim() + 1)
        shape[self.axis % x.dim()] = t.numel()
        return t.reshape(shape)

    def grid(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The grid points ``i * s`` (i = -Q_N .. Q_P) along a last dim, broadcast to ``x``."""
        i = torch.arange(-self.q_n, self.q_p + 1, dtype=torch.float32, device=x.device)
        return i * self._shaped(self.scale if scale is None else scale, x)

    def cell_probs(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                   sigma: torch.Tensor | None = None) -> torch.Tensor:
        """``p_i`` (shape ``x.shape + (2^bits,)``): the probability that ``x`` plus logistic
        noise of scale ``sigma`` lands in grid point i's cell, CDF differences at the cell
        edges, the outermost cells open (they sum to 1)."""
        s = self._shaped(self.scale if scale is None else scale, x)
        sig = self._shaped(self.sigma if sigma is None else sigma, x)
        i = torch.arange(-self.q_n, self.q_p, dtype=torch.float32, device=x.device)
        edges = (i + 0.5) * s  # the K - 1 inner edges
        cdf = torch.sigmoid((edges - x.unsqueeze(-1).float()) / sig)
        zero = torch.zeros_like(cdf[..., :1])
        cdf = torch.cat([zero, cdf, zero + 1.0], -1)
        return cdf[..., 1:] - cdf[..., :-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.init_from(x)
        self.check_positive(self.scale)
        ax = None if self.axis is None else self.axis % x.dim()
        if not self.training:  # deterministic rounding: what deploy() runs
            return lsq_fake_quantize(x, self.scale, self.q_n, self.q_p, axis=ax)
        # LSQ's gradient scale 1 / sqrt(N Q_P) on s and log sigma (their gradients are sums
        # over the N elements each one serves): SGD learning rates of the weights then suit
        n_per = x.numel() if ax is None else x.numel() // max(x.shape[ax], 1)
        g = 1.0 / math.sqrt(max(n_per, 1) * self.q_p)
        s, sig = grad_scaled(self.log_scale, g).exp(), grad_scaled(self.log_sigma, g).exp()
        logits = self.cell_probs(x, s, sig).clamp_min(_LOGP_FLOOR).log()
        u = torch.rand_like(logits).clamp(1e-10, 1.0 - 1e-7)
        z = logits - torch.log(-torch.log(u))
        soft = torch.softmax(z / self.tau, -1)
        grid = self.grid(x, s)
        x_soft = (soft * grid).sum(-1)
        if not self.hard:
            return x_soft.to(x.dtype)
        x_hard = torch.gather(grid.expand_as(z), -1, z.argmax(-1, keepdim=True)).squeeze(-1)
        return (x_hard + (x_soft - x_soft.detach())).to(x.dtype)

    def deploy(self) -> Deployed:
        if not bool(self.initialized):
            raise ValueError(f"{self.where()}: its step size is set by the first training "
                             "batch; train the prepared model before convert()")
        self.check_positive(self.scale)
        return Deployed(self.format.name, self.scale.detach().clone(), None, self.axis)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tau={self.tau}, hard={self.hard}"
