"""What every QAT quantizer is: an ``nn.Module`` that fake-quantizes a tensor while the model
trains (``forward``) and, at ``convert``, says which grid the deployed model uses
(:meth:`FakeQuant.deploy`: a qkern format, its scales and an optional offset)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ... import formats as QF

__all__ = ["Deployed", "FakeQuant", "int_format"]


def int_format(bits: int, signed: bool) -> QF.Format:
    """qkern's ``int{bits}`` / ``uint{bits}`` format."""
    return QF.get(f"{'int' if signed else 'uint'}{bits}")


@dataclass
class Deployed:
    """The grid a trained quantizer ends on: ``x_hat = (clamp(round((x - offset) / scale),
    qmin, qmax)) * scale + offset`` with ``fmt``'s ``qmin`` / ``qmax``; ``scale`` (and
    ``offset``) 0-d (per tensor) or 1-d along ``axis`` (per channel)."""

    fmt: str
    scale: torch.Tensor
    offset: torch.Tensor | None = None
    axis: int | None = None
    #: the exact fake-quantized weight when the grid is not ``round(w / scale)`` of the latent
    #: weight (DoReFa's tanh normalisation, TTQ, INQ): ``convert`` quantizes these values
    weight: torch.Tensor | None = None
    #: ``qkern.quantize``'s ``quantizer=`` (DoReFa: ``"midrise"``, a grid without zero)
    quantizer: str = "midtread"
    #: a weight deployed as the sum of several layers (TTQ's ``{-W_n, 0, W_p}``: one ternary
    #: layer per scale), each with its own ``weight``; ``fmt`` / ``scale`` then unused
    parts: list[Deployed] | None = None
    #: weights in groups of ``group_size`` along the input (``scale`` (out, in / group_size))
    group_size: int | None = None
    #: activations: ``"tensor"`` (one static ``scale``) or ``"token"`` (each row's max-abs scale
    #: at run time, deployed as QuantLinear's ``act="int8_token"``; ``scale`` unused)
    granularity: str = "tensor"


class FakeQuant(nn.Module):
    """Base class: ``bits``-bit integers, signed or not (``signed=None``: decided from the
    first batch, unsigned when it holds no negative value, as after a ReLU), one scale per
    tensor (``axis=None``) or per slice along ``axis``; weights with ``group_size``: one scale
    per group of ``group_size`` consecutive input elements (the weight viewed as
    ``(out * in / group_size, group_size)``, per slice along axis 0 of that view)."""

    #: a short name for messages
    KIND = "fake quantizer"

    def __init__(self, bits: int, signed: bool | None = True, axis: int | None = None,
                 name: str = "", group_size: int | None = None):
        super().__init__()
        if group_size is not None and axis != 0:
            raise ValueError(f"{type(self).__name__}: group_size takes a weight quantizer "
                             f"(axis 0), got axis {axis}")
        self.bits, self.signed, self.axis, self.layer = bits, signed, axis, name
        self.group_size = group_size
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    # -- groups ----------------------------------------------------------------------------
    def grouped(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` as the quantizer sees it: unchanged, or with ``group_size`` the weight
        (out, in, ...) viewed as ``(out * in_features / group_size, group_size)``."""
        if self.group_size is None:
            return w
        k = w[0].numel()
        if k % self.group_size:
            raise ValueError(f"{self.where()}: group_size {self.group_size} does not divide "
                             f"the layer's input size {k}")
        return w.reshape(-1, self.group_size)

    # -- the integer grid ------------------------------------------------------------------
    def resolve_sign(self, x: torch.Tensor) -> None:
        if self.signed is None:
            self.signed = bool((x.detach() < 0).any())

    @property
    def format(self) -> QF.Format:
        if self.signed is None:
            raise RuntimeError(f"{self.where()}: the sign of the grid is decided by the first "
                               "batch; run one through the prepared model first")
        return int_format(self.bits, self.signed)

    @property
    def q_n(self) -> int:
        return -self.format.qmin

    @property
    def q_p(self) -> int:
        return self.format.qmax

    def reduce_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        """The dims a per-``axis`` statistic reduces over."""
        if self.axis is None:
            return tuple(range(x.dim()))
        ax = self.axis % x.dim()
        return tuple(d for d in range(x.dim()) if d != ax)

    def per_axis(self, x: torch.Tensor, fn) -> torch.Tensor:
        """``fn`` over each slice along ``axis`` (over everything when per tensor)."""
        if self.axis is None:
            return fn(x.reshape(-1))
        return fn(x.movedim(self.axis % x.dim(), 0).reshape(x.shape[self.axis], -1), 1)

    def where(self) -> str:
        return f"{type(self).__name__}" + (f" of {self.layer}" if self.layer else "")

    def check_positive(self, scale: torch.Tensor, what: str = "scale") -> None:
        s = scale.detach()
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            raise ValueError(f"{self.where()}: the learned {what} went non-positive or "
                             f"non-finite (min {float(s.min()):.3g}); lower the learning rate "
                             "or clamp it after each optimizer step")

    # -- what subclasses provide -----------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def deploy(self) -> Deployed:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_ready(self) -> None:
        """Raises ValueError when ``convert`` must not run yet (INQ before its last step)."""

    def deploy_weight(self, weight: torch.Tensor) -> Deployed:
        """The grid a weight quantizer ends on, given the latent weight (``deploy()`` unless
        the grid depends on it: DoReFa, TTQ, INQ); grouped scales as (out, in / group_size)."""
        d = self.deploy()
        if self.group_size is not None:
            d.scale, d.group_size, d.axis = d.scale.reshape(weight.shape[0], -1), \
                self.group_size, None
        return d

    def regularization(self) -> torch.Tensor | float:
        """A term to add to the training loss (PACT's L2 on its clip); 0 for most."""
        return 0.0

    def extra_repr(self) -> str:
        sign = "auto" if self.signed is None else ("signed" if self.signed else "unsigned")
        per = "tensor" if self.axis is None else f"axis {self.axis}"
        if self.group_size is not None:
            per = f"group of {self.group_size}"
        return f"bits={self.bits}, {sign}, per {per}"
