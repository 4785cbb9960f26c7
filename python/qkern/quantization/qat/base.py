"""What every QAT quantizer is: an ``nn.Module`` that fake-quantizes a tensor while the model
trains (``forward``) and, at ``convert``, says which grid the deployed model uses
(:meth:`FakeQuant.deploy`: a qkern format, its scales and an optional offset)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ... import formats as QF
from ..._checks import warn_user
from ...nn import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear

__all__ = ["ConvertedModelTrainingWarning", "Deployed", "FakeQuant", "frozen_after_convert",
           "int_format", "quantized_layers", "refuse_converted"]

class ConvertedModelTrainingWarning(UserWarning):
    """A converted (frozen) QAT model run in training mode with nothing to train."""


#: qkern's quantized modules (frozen integer weights: what ``convert`` builds)
QUANTIZED = (QuantLinear, QuantConv1d, QuantConv2d, QuantEmbedding)
_TRAIN_FIRST = ("QAT trains the prepared model: qkern.prepare(float_model, QATConfig(...)), "
                "your training loop, then qkern.convert(model)")


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

    #: (attribute, name in messages) of the learned scales that must stay positive
    LEARNED: tuple[tuple[str, str], ...] = ()

    def check_ready(self) -> None:
        """Raises ValueError when ``convert`` must not run yet (INQ before its last step) or
        must not run at all (a learned scale in ``LEARNED`` gone non-positive / non-finite:
        no layer is converted, rather than that layer left in float with a warning)."""
        if bool(self.initialized):
            for attr, what in self.LEARNED:
                self.check_positive(getattr(self, attr), what)

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


# -- a converted model is frozen ---------------------------------------------------------------
def quantized_layers(model: nn.Module) -> list[str]:
    """The names of qkern's quantized modules in ``model``."""
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZED)]


def refuse_converted(model: nn.Module, what: str) -> None:
    """ValueError when ``model`` is a converted model (qkern's quantized layers and no fake
    quantizer left): ``what`` is a training step that has nothing to act on there."""
    if any(isinstance(m, FakeQuant) for m in model.modules()):
        return
    names = quantized_layers(model)
    if names:
        raise ValueError(f"{what}: the model was converted (qkern.convert): its layers "
                         f"({names[0]!r}, ...) are quantized with frozen integer weights and "
                         f"no fake quantizer is left to train. {_TRAIN_FIRST}, calling "
                         f"{what} during training")


def _needs_grad(out) -> bool:
    if isinstance(out, torch.Tensor):
        return out.requires_grad
    if isinstance(out, dict):
        return any(_needs_grad(v) for v in out.values())
    if isinstance(out, (list, tuple)):
        return any(_needs_grad(v) for v in out)
    return False


def frozen_after_convert(module: nn.Module, args, output) -> None:
    """Forward hook ``convert`` puts on a QAT model: in training mode with gradients enabled,
    an output that needs no gradient means nothing in the model can train (the quantized
    weights are integer buffers), so a training step would do nothing: one warning per model
    says so (a backward then fails in torch: nothing requires grad). An output that needs a
    gradient passes silently (inputs that require grad; adapters or other float parameters
    inside, as QLoRA trains)."""
    if module.training and torch.is_grad_enabled() and not _needs_grad(output) \
            and not getattr(module, "_qkern_frozen_warned", False):
        module._qkern_frozen_warned = True
        warn_user(f"{type(module).__name__} was converted (qkern.convert) and is in training "
                  "mode, but nothing in it can train: its quantized layers hold frozen integer "
                  f"weights (no parameters, no gradients). {_TRAIN_FIRST}. To run the "
                  "converted model, call model.eval() (or use torch.no_grad())",
                  ConvertedModelTrainingWarning)
