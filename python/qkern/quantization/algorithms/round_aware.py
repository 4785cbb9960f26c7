"""Round-aware loss shaping: a short fine-tune before round-to-nearest whose loss carries a
regulariser pulling every weight toward the integer grid of its (fixed) scale, so that the
final rounding moves the weights less.

The scales are fixed first, from the float weights (qkern's symmetric rule: ``max|w| / qmax``
per output channel or per group). With ``u = w / s`` the weight in grid units, the penalty of
one weight is (both in [0, 1], 0 exactly on the grid):

- ``"cos"``: ``(1 - cos(2 pi u)) / 2`` (smooth and periodic);
- ``"l2"``: ``4 (u - round(u))^2`` (the squared distance to the nearest grid point).

The fine-tune minimises ``task_loss + lam_t * mean(penalty)`` over the layers' weights, with
``lam_t`` ramped linearly from 0 to ``lam`` over the steps (early steps follow the task, late
ones settle on the grid); after each step the weights are clamped into the grid's range
``[qmin s, qmax s]``. The weights are then rounded on those same scales.

``RoundAwareConfig`` (through ``quantize_model``) uses the calibration batches without labels:
the task loss is the output's mean squared error to the float model's, relative to the float
output's mean square (so at ``lam = 0`` nothing moves: plain RTN). With labels, call
:func:`round_aware_finetune` with your own loss and then :func:`round_on_grid`
(docs/calibration_extras.md)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ... import formats as QF
from ...quantize import quantize
from ..calibration import call_model, float_copy
from ..layers import effective_group, warn_notes, weight_module
from ..registry import (
    BaseConfig,
    Quantizer,
    check_choice,
    check_format,
    check_group,
    check_int,
    check_real,
    config_class,
    fail,
    register_quantizer,
)

__all__ = ["PENALTIES", "Grid", "RoundAwareConfig", "RoundAwareQuantizer", "grid_penalty",
           "layer_grids", "round_aware_finetune", "round_on_grid"]

PENALTIES = ("cos", "l2")
#: per-channel scales of these formats run as one group per row (the int2-4 fused kernels
#: take groups along the input, a multiple of 32)
_ROW_GROUP_FORMATS = ("int2", "int3", "int4")


@dataclass
class Grid:
    """The fixed grid of one layer: ``fmt``, ``group_size`` (None: per output channel) and
    ``scale`` in ``qkern.quantize``'s layout for the weight matrix (out, K)."""

    fmt: str
    group_size: int | None
    scale: torch.Tensor

    def expanded(self, shape: torch.Size) -> torch.Tensor:
        """The scale of every weight element, shaped like the weight."""
        out = shape[0]
        s = self.scale.reshape(out, -1)
        k = math.prod(shape[1:])
        return s.repeat_interleave(k // s.shape[1], dim=1).reshape(shape)


def grid_penalty(w: torch.Tensor, scale: torch.Tensor, kind: str = "cos") -> torch.Tensor:
    """Mean over the elements of the penalty of ``w`` against the grid ``scale * Z``
    (``scale`` broadcastable to ``w``): ``"cos"``: ``(1 - cos(2 pi w / s)) / 2``;
    ``"l2"``: ``4 (w / s - round(w / s))^2``.

    >>> import torch
    >>> from qkern.quantization.algorithms.round_aware import grid_penalty
    >>> float(grid_penalty(torch.tensor([1.0, 2.0, 2.5]), torch.tensor(1.0), "l2"))
    0.3333333432674408
    """
    if kind not in PENALTIES:
        raise ValueError(f"kind must be one of {PENALTIES}, got {kind!r}")
    u = w / scale
    if kind == "cos":
        return ((1.0 - torch.cos(2.0 * math.pi * u)) * 0.5).mean()
    return (4.0 * (u - torch.round(u).detach()).square()).mean()


def layer_grids(model: nn.Module, layers: dict[str, tuple[str, int | None]],
                notes: dict | None = None) -> dict[str, Grid]:
    """The grid of each named layer (``name -> (fmt, group_size)``) from its current float
    weight: ``qkern.quantize``'s symmetric scales (per output channel, or per group where the
    group size divides the input size)."""
    notes = {} if notes is None else notes
    grids = {}
    for name, (fmt, group) in layers.items():
        mod = model.get_submodule(name)
        f = QF.get(fmt)
        if f.kind != "int" or f.qmin >= 0 or f.qmax < 1:
            raise ValueError(f"{name}: round-aware shaping needs a signed integer format, "
                             f"got {fmt!r}")
        g = effective_group(mod, fmt, group, notes, name)
        w = mod.weight.detach().float().reshape(mod.weight.shape[0], -1)
        gran = {"granularity": "group", "group_size": g} if g else \
            {"granularity": "channel", "axis": 0}
        grids[name] = Grid(f.name, g, quantize(w, f, symmetric=True, **gran).scale.clone())
    return grids


def round_aware_finetune(model: nn.Module, grids: dict[str, Grid], batches: Sequence,
                         loss_fn: Callable, *, steps: int = 200, lr: float = 1e-3,
                         lam: float = 1.0, penalty: str = "cos",
                         params: Sequence[torch.nn.Parameter] | None = None) -> list[float]:
    """Adam on ``loss_fn(model, batch) + lam_t * mean_layers grid_penalty(w, s)`` for
    ``steps`` steps, cycling through ``batches``; ``lam_t = lam * (t + 1) / steps``; after
    each step every gridded weight is clamped into ``[qmin s, qmax s]``. ``params``: what
    trains (default: every parameter of ``model``). Returns the penalty after each step."""
    if not batches:
        raise ValueError("round_aware_finetune needs at least one batch")
    mods = {n: model.get_submodule(n) for n in grids}
    scales = {n: grids[n].expanded(m.weight.shape).to(m.weight.dtype) for n, m in mods.items()}
    bounds = {n: (QF.get(grids[n].fmt).qmin * scales[n], QF.get(grids[n].fmt).qmax * scales[n])
              for n in grids}
    opt = torch.optim.Adam(list(params) if params is not None else model.parameters(), lr=lr)
    history = []
    model.train()
    for t in range(steps):
        pen = sum(grid_penalty(m.weight, scales[n], penalty) for n, m in mods.items())
        pen = pen / max(len(mods), 1)
        loss = loss_fn(model, batches[t % len(batches)]) + lam * (t + 1) / steps * pen
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for n, m in mods.items():
                m.weight.copy_(torch.maximum(torch.minimum(m.weight, bounds[n][1]),
                                             bounds[n][0]))
        history.append(float(pen.detach()) if torch.is_tensor(pen) else float(pen))
    model.eval()
    return history


def round_on_grid(model: nn.Module, grids: dict[str, Grid], swap=None) -> nn.Module:
    """Replaces every layer of ``grids`` by its quantized twin rounded on the grid's fixed
    scales (in place; returns ``model``). ``swap(model, name, make)``: how to replace (a
    Quantizer's ``swap``; default: set the submodule)."""
    notes: dict[str, str] = {}
    for name, g in grids.items():
        mod = model.get_submodule(name)

        gs, sc, k = g.group_size, g.scale, mod.weight[0].numel()
        if gs is None and k % 32 == 0 and g.fmt in _ROW_GROUP_FORMATS:  # fused int2-4 kernels
            gs, sc = k, sc.reshape(-1, 1)

        def make(mod=mod, gs=gs, sc=sc, fmt=g.fmt, name=name):
            return weight_module(mod, fmt, gs, notes, name,
                                 params=lambda w, _g: {"scale": sc}, symmetric=True)
        if swap is not None:
            swap(model, name, make)
        else:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, make())
    warn_notes(notes)
    return model


def _tensor(out) -> torch.Tensor:
    """A model output as one tensor (``.logits``, or the first tensor of a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"round-aware shaping needs a tensor model output, got {type(out).__name__}")


@config_class
@dataclass
class RoundAwareConfig(BaseConfig):
    """Weight-only RTN after a short fine-tune that pulls the weights toward their grid
    (module docstring): signed integer ``fmt``, per output channel (``group_size=None``) or in
    groups; ``steps`` Adam steps at ``lr`` on the calibration batches, ``lam`` the final
    weight of the ``penalty`` (``"cos"`` / ``"l2"``) beside the output MSE to the float model.

    >>> import torch, qkern
    >>> torch.manual_seed(0) and None
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> cfg = qkern.quantization.RoundAwareConfig(fmt="int3", steps=20)
    >>> q = qkern.quantize_model(net, cfg, calibration=[torch.randn(32, 8)])
    >>> type(q[0]).__name__
    'QuantLinear'
    """

    fmt: str = "int4"
    group_size: int | None = None
    steps: int = 200
    lr: float = 1e-3
    lam: float = 1.0
    penalty: str = "cos"

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_format(n, "fmt", self.fmt)
        f = QF.get(self.fmt)
        if f.kind != "int" or f.qmin >= 0 or f.qmax < 1:
            fail(n, "fmt", "a signed integer format (int2..int8)", self.fmt)
        check_group(n, "group_size", self.group_size)
        check_int(n, "steps", self.steps, 1)
        check_real(n, "lr", self.lr, 1e-12, 1e3, "a positive number")
        check_real(n, "lam", self.lam, 0.0, 1e9, "a number >= 0")
        check_choice(n, "penalty", self.penalty, PENALTIES)
        super().__post_init__()


@register_quantizer(RoundAwareConfig)
class RoundAwareQuantizer(Quantizer):
    """Fine-tunes the whole model on the calibration batches (output MSE to the float model +
    the ramped grid penalty of the planned layers), then rounds those layers on the scales
    fixed before the fine-tune."""

    SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)

    def records_inputs(self) -> bool:
        return True

    def needs_calibration(self) -> str | None:
        return "fine-tunes the weights toward their grid on calibration inputs"

    def calibrated(self, model: nn.Module) -> bool:
        return bool(self.batches)

    def convert(self, model: nn.Module) -> None:
        cfg, notes = self.config, {}
        grids = layer_grids(model, {n: (c.fmt, c.group_size) for n, c in self.plan}, notes)
        warn_notes(notes)
        ref = float_copy(model)
        with torch.no_grad():
            targets = [_tensor(call_model(ref, b)).detach() for b in self.batches]
        norms = [float(t.float().square().mean()) or 1.0 for t in targets]
        index = {id(b): i for i, b in enumerate(self.batches)}

        def loss_fn(m, batch):
            i = index[id(batch)]
            return (_tensor(call_model(m, batch)) - targets[i]).float().square().mean() / norms[i]

        self.penalties = round_aware_finetune(model, grids, self.batches, loss_fn,
                                              steps=cfg.steps, lr=cfg.lr, lam=cfg.lam,
                                              penalty=cfg.penalty)
        round_on_grid(model, grids, self.swap)
