"""The built-in quantizers: weight-only, dynamic, static and activation-only PTQ."""

from __future__ import annotations

import torch
from torch import nn

from .. import formats as QF
from ..nn import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear
from .api import Quantizer, _replace, register_quantizer
from .config import ActivationOnlyConfig, BaseConfig, DynamicConfig, StaticConfig, WeightOnlyConfig

__all__ = ["ActivationOnlyQuantizer", "DynamicQuantizer", "StaticQuantizer",
           "WeightOnlyQuantizer"]

_CONV = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}


def _in_features(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return mod.in_features
    if isinstance(mod, nn.Embedding):
        return mod.embedding_dim
    return mod.weight[0].numel()  # conv: in_channels * prod(kernel)


def _conv_problem(mod: nn.Module) -> str | None:
    if mod.groups != 1:
        return f"grouped convolution (groups={mod.groups}) is not supported"
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        return f"padding {mod.padding!r} / mode {mod.padding_mode!r} is not supported"
    return None


def _weight_module(mod: nn.Module, fmt: str, group_size: int | None, notes: dict, name: str,
                   **kw) -> nn.Module:
    """The quantized twin of ``mod`` (Linear, Conv1d/2d, Embedding). A group size that does
    not divide the layer's input size falls back to per-channel scales (noted)."""
    f = QF.get(fmt)
    g = group_size if group_size is not None else f.block_size
    if g is not None and _in_features(mod) % g:
        if f.block_size is not None:
            raise ValueError(f"{name}: block format {fmt} needs the input size "
                             f"({_in_features(mod)}) to be a multiple of {g}")
        notes[name] = (f"group_size {g} does not divide its input size {_in_features(mod)}: "
                       "quantized per output channel")
        g = None
    if isinstance(mod, nn.Embedding):
        if kw.get("double_quant"):
            notes[name] = "embedding scales are kept in float32 (no double quantization)"
        kw = {k: v for k, v in kw.items()
              if k not in ("act", "mode", "act_scale", "double_quant")}
        return QuantEmbedding.from_float(mod, fmt, group_size=g, **kw)
    if type(mod) in _CONV:
        return _CONV[type(mod)].from_float(mod, fmt, group_size=g, **kw)
    return QuantLinear.from_float(mod, fmt, group_size=g, **kw)


@register_quantizer(WeightOnlyConfig)
class WeightOnlyQuantizer(Quantizer):
    SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)

    def unsupported(self, name, mod, cfg):
        why = super().unsupported(name, mod, cfg)
        if why is None and type(mod) in _CONV:
            why = _conv_problem(mod)
        return why

    def convert(self, model: nn.Module) -> None:
        notes: dict[str, str] = {}
        for name, cfg in self.plan:
            mod = model.get_submodule(name)
            kw = {"symmetric": cfg.symmetric, "rounding": cfg.rounding}
            if cfg.double_quant:
                kw["double_quant"] = True
            if not isinstance(mod, nn.Embedding):
                kw["mode"] = cfg.mode
            self._swap(model, name, lambda: _weight_module(mod, cfg.fmt, cfg.group_size, notes,
                                                           name, **kw))
        self.notes = notes
        _note(notes)


def _note(notes: dict[str, str]) -> None:
    if notes:
        import warnings

        lines = "\n".join(f"  {n}: {why}" for n, why in notes.items())
        warnings.warn(f"{len(notes)} layer(s) quantized differently from the config:\n{lines}",
                      stacklevel=4)


@register_quantizer(DynamicConfig)
class DynamicQuantizer(Quantizer):
    SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)

    def unsupported(self, name, mod, cfg):
        why = super().unsupported(name, mod, cfg)
        if why is None and type(mod) in _CONV:
            why = _conv_problem(mod)
        return why

    def convert(self, model: nn.Module) -> None:
        for name, cfg in self.plan:
            act = "int8_dynamic" if cfg.act_granularity == "per_token" else "int8_dynamic_tensor"
            mod = model.get_submodule(name)
            self._swap(model, name, lambda: _weight_module(mod, cfg.fmt, None, {}, name,
                                                           act=act))


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
    in calibration) in front of ``module``."""

    def __init__(self, module: nn.Module, fmt: str, scale: torch.Tensor,
                 zero_point: torch.Tensor | None):
        super().__init__()
        self.module, self.fmt = module, QF.get(fmt).name
        self.register_buffer("scale", scale.detach().float().reshape(()).clone())
        self.register_buffer("zero_point", None if zero_point is None
                             else zero_point.detach().to(torch.int32).reshape(()).clone())

    def forward(self, x, *args, **kwargs):
        from ..quantize import quantize

        q = quantize(x.float(), self.fmt, granularity="tensor", scale=self.scale,
                     zero_point=self.zero_point, symmetric=self.zero_point is None)
        return self.module(q.dequantize().to(x.dtype), *args, **kwargs)

    def extra_repr(self) -> str:
        zp = "" if self.zero_point is None else f", zero_point={int(self.zero_point)}"
        return f"act_fmt={self.fmt}, scale={float(self.scale):.6g}{zp}"


def _make_observer(cfg: BaseConfig) -> nn.Module:
    from ..observers import make_observer

    return make_observer(cfg.observer, fmt=cfg.act_fmt, symmetric=cfg.act_symmetric,
                         granularity="tensor")


class _StaticBase(Quantizer):
    NEEDS_CALIBRATION = True
    SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)

    def unsupported(self, name, mod, cfg):
        why = super().unsupported(name, mod, cfg)
        if why is None and type(mod) in _CONV:
            why = _conv_problem(mod)
        return why

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        for name, cfg in self.plan:
            _replace(model, name, ObservedInput(model.get_submodule(name), _make_observer(cfg)))

    def calibrated(self, model: nn.Module) -> bool:
        return all(_seen(model.get_submodule(name).observer) for name, _ in self.plan)

    def _observed(self, model, name):
        wrapper = model.get_submodule(name)
        if not isinstance(wrapper, ObservedInput):
            raise ValueError(f"{name}: expected the observer inserted by prepare(); was the "
                             "prepared model modified?")
        scale, zp = wrapper.observer.calculate_qparams()
        return wrapper.module, scale, (None if zp is None else zp)


def _seen(observer: nn.Module) -> bool:
    return int(observer.num_batches) > 0


@register_quantizer(ActivationOnlyConfig)
class ActivationOnlyQuantizer(_StaticBase):
    def convert(self, model: nn.Module) -> None:
        for name, cfg in self.plan:
            mod, scale, zp = self._observed(model, name)
            _replace(model, name, ActQuant(mod, cfg.act_fmt, scale, zp))


@register_quantizer(StaticConfig)
class StaticQuantizer(_StaticBase):
    """int8 per-channel symmetric weights with symmetric int8 activations run the W8A8 kernel
    with the calibrated activation scale; any other combination quantizes the activations
    with ActQuant in front of a weight-quantized layer."""

    def convert(self, model: nn.Module) -> None:
        notes: dict[str, str] = {}
        for name, cfg in self.plan:
            mod, scale, zp = self._observed(model, name)
            fused = (cfg.fmt == "int8" and cfg.group_size is None and cfg.symmetric
                     and cfg.act_fmt == "int8" and zp is None)
            if fused:
                def make():
                    return _weight_module(mod, "int8", None, notes, name, symmetric=True,
                                          act="int8_static", act_scale=_int8_scale(scale))
            else:
                def make():
                    return ActQuant(_weight_module(mod, cfg.fmt, cfg.group_size, notes, name,
                                                   symmetric=cfg.symmetric), cfg.act_fmt,
                                    scale, zp)
            self._swap(model, name, make, float_mod=mod)
        _note(notes)


def _int8_scale(scale: torch.Tensor) -> torch.Tensor:
    """The W8A8 kernel clamps activation codes to [-127, 127]; an observer's symmetric int8
    scale is amax / 127 (qkern's symmetric convention), used as is."""
    return scale.detach().float().reshape(())
