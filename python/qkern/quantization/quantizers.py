"""The built-in quantizers: weight-only, dynamic, static and activation-only PTQ."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import formats as QF
from ..nn import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear
from .api import Quantizer, _replace, register_quantizer, user_warning
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


def _effective_group(mod: nn.Module, fmt: str, group_size: int | None, notes: dict,
                     name: str) -> int | None:
    """The group size a layer gets: a group size that does not divide the layer's input size
    falls back to per-channel scales (noted); block formats must fit."""
    f = QF.get(fmt)
    g = group_size if group_size is not None else f.block_size
    if g is not None and _in_features(mod) % g:
        if f.block_size is not None:
            raise ValueError(f"{name}: block format {fmt} needs the input size "
                             f"({_in_features(mod)}) to be a multiple of {g}")
        notes[name] = (f"group_size {g} does not divide its input size {_in_features(mod)}: "
                       "quantized per output channel")
        g = None
    return g


def _weight_module(mod: nn.Module, fmt: str, group_size: int | None, notes: dict, name: str,
                   params=None, **kw) -> nn.Module:
    """The quantized twin of ``mod`` (Linear, Conv1d/2d, Embedding). ``params``: None, or a
    function (weight matrix (out, K), group size or None) -> extra ``qkern.quantize``
    arguments (given scales from a clip search, a per-tensor scale)."""
    g = _effective_group(mod, fmt, group_size, notes, name)
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


def _any_layer(cfg: BaseConfig, pred) -> bool:
    """``pred`` holds for the config or for a per-layer override of it."""
    cfgs = [cfg] + [dataclasses.replace(cfg, overrides={}, **v)
                    for v in cfg.overrides.values() if isinstance(v, dict)]
    return any(pred(c) for c in cfgs)


def _wants_data(c) -> bool:
    return c.bias_correction or c.clip_search == "output"


def _equalize(model: nn.Module, cfg: BaseConfig) -> None:
    if cfg.cross_layer_equalization:
        from .correction import cross_layer_equalization

        cross_layer_equalization(model, inplace=True)


@register_quantizer(WeightOnlyConfig)
class WeightOnlyQuantizer(Quantizer):
    SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)

    def prepare(self, model: nn.Module) -> None:
        _equalize(model, self.config)
        super().prepare(model)

    def records_inputs(self) -> bool:
        return _any_layer(self.config, _wants_data)

    def needs_calibration(self) -> str | None:
        if self.records_inputs():
            return ("measures layer outputs on calibration data (bias_correction=True or "
                    "clip_search='output')")
        return None

    def calibrated(self, model: nn.Module) -> bool:
        return bool(self.batches) or not self.records_inputs()

    def convert(self, model: nn.Module) -> None:
        from . import correction as C

        notes: dict[str, str] = {}
        batches = self.batches
        fixed = [n for n, c in self.plan if c.bias_correction]
        float_ref = C.float_copy(model) if fixed else None
        search = [n for n, c in self.plan if c.clip_search == "output"
                  and not isinstance(model.get_submodule(n), nn.Embedding)]
        grams = C.collect_grams(model, search, batches) if search else {}
        for name, cfg in self.plan:
            mod = model.get_submodule(name)
            kw = {"symmetric": cfg.symmetric, "rounding": cfg.rounding}
            if cfg.double_quant:
                kw["double_quant"] = True
            if not isinstance(mod, nn.Embedding):
                kw["mode"] = cfg.mode
            params = C.weight_params(cfg, grams.get(name), notes, name)
            group = None if cfg.per_tensor else cfg.group_size
            self._swap(model, name, lambda: _weight_module(mod, cfg.fmt, group, notes, name,
                                                           params=params, **kw))
        if fixed:
            C.bias_correction(float_ref, model, batches,
                              layers=[n for n in fixed if n not in self.skipped])
        self.notes = notes
        _note(notes)


def _note(notes: dict[str, str]) -> None:
    if notes:
        lines = "\n".join(f"  {n}: {why}" for n, why in notes.items())
        user_warning(f"{len(notes)} layer(s) quantized differently from the config:\n{lines}")


@register_quantizer(DynamicConfig)
class DynamicQuantizer(Quantizer):
    SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)

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

    def _replay(self) -> bool:
        """True when convert() re-runs the recorded calibration batches itself (smoothing,
        progressive calibration, output clip search, bias correction)."""
        return _any_layer(self.config, lambda c: _wants_data(c) or c.progressive
                          or c.smoothing_alpha is not None)

    def records_inputs(self) -> bool:
        return self._replay()

    def prepare(self, model: nn.Module) -> None:
        _equalize(model, self.config)
        if self._replay():  # observers come in convert()
            Quantizer.prepare(self, model)
        else:
            super().prepare(model)

    def calibrated(self, model: nn.Module) -> bool:
        return bool(self.batches) if self._replay() else super().calibrated(model)

    def convert(self, model: nn.Module) -> None:
        from . import correction as C

        notes: dict[str, str] = {}
        if self._replay():
            self._convert_replay(model, notes)
        else:
            for name, cfg in self.plan:
                mod, scale, zp = self._observed(model, name)
                self._convert_layer(model, name, cfg, mod, scale, zp, notes,
                                    C.weight_params(cfg, None, notes, name))
        _note(notes)

    def _convert_layer(self, model, name, cfg, mod, scale, zp, notes, params) -> None:
        group = None if cfg.per_tensor else cfg.group_size
        fused = (cfg.fmt == "int8" and group is None and cfg.symmetric
                 and cfg.act_fmt == "int8" and zp is None)
        if fused:
            def make():
                return _weight_module(mod, "int8", None, notes, name, params=params,
                                      symmetric=True, act="int8_static",
                                      act_scale=_int8_scale(scale))
        else:
            def make():
                return ActQuant(_weight_module(mod, cfg.fmt, group, notes, name,
                                               params=params, symmetric=cfg.symmetric),
                                cfg.act_fmt, scale, zp)
        self._swap(model, name, make, float_mod=mod)

    def _convert_replay(self, model: nn.Module, notes: dict) -> None:
        """Smoothing, then observers and clip searches: all layers at once, or, when
        ``progressive``, one layer at a time in execution order on the inputs of the
        already-quantized (and bias-corrected) prefix; then bias correction."""
        from . import correction as C

        batches, cfgs = self.batches, dict(self.plan)
        progressive = self.config.progressive
        alphas = {n: c.smoothing_alpha for n, c in self.plan if c.smoothing_alpha is not None}
        if alphas:
            C.smooth_quant(model, batches, alpha=alphas, inplace=True, layers=list(alphas))
        fixed = [n for n, c in self.plan if c.bias_correction]
        search = {n for n, c in self.plan if c.clip_search == "output"}
        float_ref = C.float_copy(model) if fixed or (progressive and search) else None
        order = C.execution_order(model, list(cfgs), batches)
        for stage in ([[n] for n in order] if progressive else [order]):
            observers = {n: _make_observer(cfgs[n]) for n in stage}
            grams = {n: C.Gram(model.get_submodule(n)) for n in stage
                     if n in search and not progressive}

            def hook(n):
                def pre(mod, args):
                    observers[n](args[0].detach())
                    if n in grams:
                        grams[n](mod, args)
                return pre

            C.run_batches(model, batches, {n: (hook(n), None) for n in stage})
            for n in stage:
                if not _seen(observers[n]):
                    raise ValueError(f"{n}: the layer did not run on the calibration data")
                scale, zp = observers[n].calculate_qparams()
                gram = cross = None
                if n in grams:
                    gram = grams[n].matrix()
                elif n in search:  # progressive: E||W x - W_q x^||^2 with x^ the prefix's
                    gram, cross = C.paired_moments(float_ref, model, n, batches)
                self._convert_layer(model, n, cfgs[n], model.get_submodule(n), scale, zp,
                                    notes, C.weight_params(cfgs[n], gram, notes, n, cross))
                if progressive and n in fixed and n not in self.skipped:
                    C.bias_correction(float_ref, model, batches, layers=[n])
        if fixed and not progressive:
            C.bias_correction(float_ref, model, batches,
                              layers=[n for n in fixed if n not in self.skipped])


def _int8_scale(scale: torch.Tensor) -> torch.Tensor:
    """The W8A8 kernel clamps activation codes to [-127, 127]; an observer's symmetric int8
    scale is amax / 127 (qkern's symmetric convention), used as is."""
    return scale.detach().float().reshape(())
