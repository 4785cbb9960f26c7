"""Float layers -> their quantized twins, and the modules calibration puts around layers.

- :func:`weight_module`: the quantized twin of a Linear / Conv1d / Conv2d / Embedding
  (QuantLinear, QuantConv1d/2d, QuantEmbedding) with the group size :func:`effective_group`
  gives it;
- :class:`ObservedInput` (calibration: an observer on a layer's input) and :class:`ActQuant`
  (static activation quantization in front of a layer), with :func:`input_observer` making
  the observer a config asks for and :class:`ObservingQuantizer` the quantizer base that
  wraps its layers in ObservedInput at prepare time;
- :func:`warn_notes`: the warning listing layers quantized differently from their config.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import formats as QF
from .._checks import warn_user
from ..nn import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear
from ..observers import OBSERVERS, make_observer
from ..quantize import fake_quantize
from .constraints import (
    HardwareConstraints,
    check_input_format,
    constrain_activation,
    constrained_weight,
    grid_params,
    whole_layer,
)
from .registry import BaseConfig, Quantizer, replace_module

__all__ = ["OBSERVER_NAMES", "ActQuant", "ObservedInput", "ObservingQuantizer", "ParallelSum",
           "effective_group", "in_features", "input_observer", "observer_seen", "warn_notes",
           "weight_module"]

_CONV = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}
#: the observers a config's ``observer`` field may name
OBSERVER_NAMES = tuple(OBSERVERS)


def in_features(mod: nn.Module) -> int:
    """The input size a layer's weight rows multiply (conv: in_channels * prod(kernel))."""
    if isinstance(mod, nn.Linear):
        return mod.in_features
    if isinstance(mod, nn.Embedding):
        return mod.embedding_dim
    return mod.weight[0].numel()  # conv: in_channels * prod(kernel)


def effective_group(mod: nn.Module, fmt: str, group_size: int | None, notes: dict,
                    name: str) -> int | None:
    """The group size a layer gets: a group size that does not divide the layer's input size
    falls back to per-channel scales (noted); block formats must fit."""
    f = QF.get(fmt)
    g = group_size if group_size is not None else f.block_size
    if g is not None and in_features(mod) % g:
        if f.block_size is not None:
            raise ValueError(f"{name}: block format {fmt} needs the input size "
                             f"({in_features(mod)}) to be a multiple of {g}")
        notes[name] = (f"group_size {g} does not divide its input size {in_features(mod)}: "
                       "quantized per output channel")
        g = None
    return g


def weight_module(mod: nn.Module, fmt: str, group_size: int | None, notes: dict, name: str,
                  params=None, constraints: HardwareConstraints | None = None,
                  **kw) -> nn.Module:
    """The quantized twin of ``mod`` (Linear, Conv1d/2d, Embedding). ``params``: None, or a
    function (weight matrix (out, K), group size or None) -> extra ``qkern.quantize``
    arguments (given scales from a clip search, a per-tensor scale). ``constraints``
    (quantization/constraints.py): symmetric per-channel (or per-tensor) scales, power of two
    and / or within the accumulator's l1 budget, replacing ``params`` and ``group_size``."""
    if constraints is not None and constraints.touches_weights() and not isinstance(
            mod, nn.Embedding):
        return _constrained_module(mod, fmt, group_size, notes, name, params, constraints, kw)
    g = effective_group(mod, fmt, group_size, notes, name)
    if isinstance(mod, nn.Embedding):
        if kw.get("double_quant"):
            notes[name] = "embedding scales are kept in float32 (no double quantization)"
        kw = {k: v for k, v in kw.items()
              if k not in ("act", "mode", "act_scale", "double_quant")}
        return QuantEmbedding.from_float(mod, fmt, group_size=g, **kw)
    if params is not None:
        w = mod.weight.detach().float()
        kw.update(params(w.reshape(w.shape[0], -1), g))
    if type(mod) in _CONV:
        return _CONV[type(mod)].from_float(mod, fmt, group_size=g, **kw)
    return QuantLinear.from_float(mod, fmt, group_size=g, **kw)


def _constrained_module(mod, fmt, group_size, notes, name, params, c, kw) -> nn.Module:
    """weight_module under hardware constraints. With ``accumulator_bits`` or ``per_tensor``:
    the weight replaced by ``codes * scale`` (constraints.constrained_weight), quantized per
    channel with those symmetric scales. Otherwise (power-of-two and / or symmetric only, an
    integer format) the layer keeps its groups and, unless ``symmetric``, its zero points, on
    the grid of constraints.grid_params."""
    f = QF.get(fmt)
    if f.block_size is not None:
        raise ValueError(f"{name}: block format {fmt} has its own scales; hardware "
                         "constraints need per-channel or per-tensor scales")
    whole = whole_layer(c, fmt)
    sym = kw.get("symmetric", True) is not False
    row = group_size is not None and group_size == in_features(mod)  # one group: per channel
    why = [w for w, on in ((f"group_size {group_size} -> per-channel scales",
                            group_size is not None and whole and not row),
                           ("clip search / weight observer not applied", params is not None),
                           ("symmetric weights", not sym and (whole or c.symmetric))) if on]
    if why:
        notes[name] = "hardware constraints: " + "; ".join(why)
    w = mod.weight.detach().float()
    w2 = w.reshape(w.shape[0], -1)
    kw = {k: v for k, v in kw.items() if k not in ("symmetric", "scale", "zero_point")}
    if whole:
        g = group_size if row else None  # int2-4 kernels take a row as one group
        w_exact, scale, _ = constrained_weight(w2, fmt, c, name)
        scale = scale.reshape(-1, 1) if row else scale
        zp = None
        twin = copy.deepcopy(mod)
        with torch.no_grad():
            twin.weight.copy_(w_exact.reshape(w.shape).to(twin.weight.dtype))
    else:
        g = effective_group(mod, fmt, group_size, notes, name)
        scale, zp = grid_params(w2, fmt, c, sym, g, name)
        twin = mod
    kw.update(symmetric=zp is None, scale=scale)
    if zp is not None:
        kw["zero_point"] = zp
    if type(mod) in _CONV:
        return _CONV[type(mod)].from_float(twin, fmt, group_size=g, **kw)
    return QuantLinear.from_float(twin, fmt, group_size=g, **kw)


def warn_notes(notes: dict[str, str]) -> None:
    """One warning listing the layers quantized differently from the config, and why."""
    if notes:
        lines = "\n".join(f"  {n}: {why}" for n, why in notes.items())
        warn_user(f"{len(notes)} layer(s) quantized differently from the config:\n{lines}")


# ---- static activations ------------------------------------------------------------------


class ObservedInput(nn.Module):
    """Calibration wrapper: records the statistics of the first input of ``module`` in
    ``observer``, then runs the module unchanged."""

    def __init__(self, module: nn.Module, observer: nn.Module):
        super().__init__()
        self.module, self.observer = module, observer

    def forward(self, x, *args, **kwargs):
        self.observer(x.detach())
        return self.module(x, *args, **kwargs)


class ActQuant(nn.Module):
    """Static activation quantization (quantize-dequantize on qkern's ops with a range fixed
    in calibration or learned in QAT) in front of ``module``; differentiable with the clipped
    straight-through estimator (``qkern.fake_quantize``). ``offset`` (LSQ+'s learned float
    offset beta): ``module(dequantize(quantize(x - offset)) + offset)``."""

    def __init__(self, module: nn.Module, fmt: str, scale: torch.Tensor,
                 zero_point: torch.Tensor | None, offset: torch.Tensor | None = None):
        super().__init__()
        self.module, self.fmt = module, QF.get(fmt).name
        self.register_buffer("scale", scale.detach().float().reshape(()).clone())
        self.register_buffer("zero_point", None if zero_point is None
                             else zero_point.detach().to(torch.int32).reshape(()).clone())
        self.register_buffer("offset", None if offset is None
                             else torch.as_tensor(offset).detach().float().reshape(()).clone())

    def forward(self, x, *args, **kwargs):
        v = x.float() if self.offset is None else x.float() - self.offset
        xq = fake_quantize(v, self.fmt, granularity="tensor", scale=self.scale,
                           zero_point=self.zero_point, symmetric=self.zero_point is None)
        if self.offset is not None:
            xq = xq + self.offset
        return self.module(xq.to(x.dtype), *args, **kwargs)

    def extra_repr(self) -> str:
        zp = "" if self.zero_point is None else f", zero_point={int(self.zero_point)}"
        off = "" if self.offset is None else f", offset={float(self.offset):.6g}"
        return f"act_fmt={self.fmt}, scale={float(self.scale):.6g}{zp}{off}"


class ParallelSum(nn.Module):
    """``sum(m(x) for m in parts)``: a layer deployed as several quantized layers (TTQ's
    ``{-W_n, 0, W_p}`` as two ternary layers, the bias on the first)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.parts[0](x)
        for m in self.parts[1:]:
            y = y + m(x)
        return y


def input_observer(cfg: BaseConfig) -> nn.Module:
    """The per-tensor observer of a layer input that ``cfg`` asks for (its ``observer``,
    ``act_fmt`` and ``act_symmetric`` fields; symmetric when its constraints say so)."""
    sym = cfg.act_symmetric or (cfg.constraints is not None and cfg.constraints.symmetric)
    return make_observer(cfg.observer, fmt=cfg.act_fmt, symmetric=sym, granularity="tensor")


def observer_seen(observer: nn.Module) -> bool:
    """True once ``observer`` has recorded at least one batch."""
    return int(observer.num_batches) > 0


class ObservingQuantizer(Quantizer):
    """Base of the methods with static activation ranges: prepare() wraps every planned layer
    in an :class:`ObservedInput` whose observer (:func:`input_observer`) sees the calibration
    data; convert() reads them with :meth:`observed`."""

    NEEDS_CALIBRATION = True
    SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        for name, cfg in self.plan:
            if cfg.constraints is not None:
                check_input_format(cfg.constraints, cfg.act_fmt,
                                   f"{type(cfg).__name__} ({name})")
        for name, cfg in self.plan:
            replace_module(model, name, ObservedInput(model.get_submodule(name),
                                                      input_observer(cfg)))

    def calibrated(self, model: nn.Module) -> bool:
        return all(observer_seen(model.get_submodule(name).observer) for name, _ in self.plan)

    def observed(self, model, name):
        """(the float layer, activation scale, zero point or None) of a wrapped layer."""
        wrapper = model.get_submodule(name)
        if not isinstance(wrapper, ObservedInput):
            raise ValueError(f"{name}: expected the observer inserted by prepare(); was the "
                             "prepared model modified?")
        scale, zp = wrapper.observer.calculate_qparams()
        cfg = dict(self.plan)[name]
        scale, zp = constrain_activation(scale, zp, cfg.constraints, name)
        return wrapper.module, scale, (None if zp is None else zp)
