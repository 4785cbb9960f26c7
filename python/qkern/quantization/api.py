"""``prepare`` / ``convert`` / ``quantize_model`` and the quantizer registry.

Adding an algorithm = a config dataclass (``@config_class``, validated in ``__post_init__``)
plus a :class:`Quantizer` subclass registered for it with ``@register_quantizer(ConfigCls)``.
``prepare`` and ``convert`` dispatch on ``type(quant_config)``.
"""

from __future__ import annotations

import copy
import fnmatch
import sys
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .config import BaseConfig

__all__ = ["Quantizer", "convert", "prepare", "quantize_model", "register_quantizer",
           "run_calibration"]

_QUANTIZERS: dict[type, type[Quantizer]] = {}
_STATE = "_qkern_state"


def register_quantizer(config_cls: type[BaseConfig]):
    """Class decorator: ``@register_quantizer(MyConfig) class MyQuantizer(Quantizer): ...``."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, BaseConfig)):
        raise TypeError(f"register_quantizer expects a BaseConfig subclass, got {config_cls!r}")

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
            raise TypeError(f"{cls!r} must subclass qkern.quantization.Quantizer")
        _QUANTIZERS[config_cls] = cls
        return cls

    return deco


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules holding a weight matrix or kernel of their own (a parameter with >= 2 dims):
    the layers a quantizer may take; norms and biases are not among them."""
    out = []
    for name, mod in model.named_modules():
        if name and any(p.dim() >= 2 for p in mod.parameters(recurse=False)):
            out.append((name, mod))
    return out


def _matches(name: str, mod: nn.Module, patterns: Iterable[str]) -> bool:
    return any(p == type(mod).__name__ or fnmatch.fnmatchcase(name, p) for p in patterns)


class Quantizer:
    """One algorithm. ``prepare(model)`` and ``convert(model)`` work in place on the model
    they are given (the API functions take care of copying the user's model)."""

    #: layer types this quantizer converts (exact types: subclasses such as
    #: MultiheadAttention's out_proj are not assumed to behave like their base)
    SUPPORTED: tuple[type, ...] = (nn.Linear,)
    #: True when convert() needs calibration data seen after prepare()
    NEEDS_CALIBRATION = False

    def __init__(self, config: BaseConfig):
        self.config = config
        self.plan: list[tuple[str, BaseConfig]] = []  # (layer name, its config)
        self.skipped: dict[str, str] = {}  # layer name -> why it stays float
        #: the model inputs seen between prepare() and convert(), kept (cloned) when
        #: records_inputs() is True, for methods that re-run calibration inside convert()
        self.batches: list[_Batch] = []

    def needs_calibration(self) -> str | None:
        """Why convert() needs calibration data (None: it does not)."""
        if self.NEEDS_CALIBRATION:
            return "quantizes activations with ranges from calibration"
        return None

    def records_inputs(self) -> bool:
        """True when prepare() should keep every calibration batch for convert()."""
        return False

    def _record(self, module, args, kwargs) -> None:
        self.batches.append(_Batch(_clone(args), _clone(kwargs)))

    def select(self, model: nn.Module) -> None:
        """Fills ``plan`` from include / exclude / overrides; unsupported layers that the
        config would have taken go to ``skipped``."""
        cfg = self.config
        for name, mod in weight_layers(model):
            if cfg.include is not None and not _matches(name, mod, cfg.include):
                continue
            if _matches(name, mod, cfg.exclude):
                continue
            layer_cfg = cfg.for_layer(name)
            if layer_cfg is None:
                continue
            why = self.unsupported(name, mod, layer_cfg)
            if why:
                self.skipped[name] = why
            else:
                self.plan.append((name, layer_cfg))

    def unsupported(self, name: str, mod: nn.Module, cfg: BaseConfig) -> str | None:
        """Why this quantizer cannot take ``mod`` (None: it can)."""
        if type(mod) not in self.SUPPORTED:
            return f"{type(mod).__name__} is not supported by {type(self).__name__}"
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):  # what QuantConv1d/2d (im2col) can take
            if mod.groups != 1:
                return f"grouped convolution (groups={mod.groups}) is not supported"
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                return f"padding {mod.padding!r} / mode {mod.padding_mode!r} is not supported"
        return None

    def prepare(self, model: nn.Module) -> None:
        self.select(model)

    def convert(self, model: nn.Module) -> None:
        raise NotImplementedError

    def calibrated(self, model: nn.Module) -> bool:
        return True

    def _swap(self, model: nn.Module, name: str, make, float_mod: nn.Module | None = None):
        """Replaces layer ``name`` by ``make()``; a layer the build rejects (ValueError: a
        shape its format cannot take...) goes back to ``float_mod`` (or stays as it is) and is
        listed in the warning, so a model is never half-quantized silently."""
        try:
            new = make()
        except ValueError as e:
            self.skipped[name] = str(e)
            if float_mod is not None:
                _replace(model, name, float_mod)
            return
        _replace(model, name, new)

    def warn_skipped(self) -> None:
        if self.skipped:
            lines = "\n".join(f"  {n}: {why}" for n, why in self.skipped.items())
            user_warning(f"{len(self.skipped)} layer(s) left in float:\n{lines}")


def user_warning(message: str) -> None:
    """A UserWarning attributed to the first caller outside the qkern package."""
    import os

    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(pkg):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _clone(v):
    """Tensors inside (nested) tuples / lists / dicts detached and copied, so a caller that
    reuses its input buffers does not change the recorded batches."""
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (tuple, list)):
        return type(v)(_clone(x) for x in v)
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    return v


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _quantizer_for(config) -> Quantizer:
    if not isinstance(config, BaseConfig):
        raise TypeError(f"quant_config must be a qkern config (e.g. qkern.WeightOnlyConfig()), "
                        f"got {type(config).__name__}")
    cls = _QUANTIZERS.get(type(config))
    if cls is None:
        raise ValueError(f"no quantizer is registered for {type(config).__name__}; register "
                         "one with @qkern.quantization.register_quantizer")
    return cls(config)


def _call(model: nn.Module, batch) -> Any:
    if isinstance(batch, _Batch):
        return model(*batch.args, **batch.kwargs)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def run_calibration(model: nn.Module, calibration: Iterable, progress: bool = False) -> int:
    """Runs every batch (a tensor, a tuple of positional inputs or a dict of keyword inputs)
    through ``model`` without gradients; returns the number of batches."""
    n = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for n, batch in enumerate(calibration, 1):
                _call(model, batch)
                if progress and (n & (n - 1) == 0 or n % 50 == 0):
                    print(f"qkern: calibrated on {n} batch(es)", file=sys.stderr, flush=True)
    finally:
        model.train(was_training)
    return n


def prepare(model: nn.Module, quant_config: BaseConfig, args=None, kwargs=None,
            inplace: bool = False) -> nn.Module:
    """Readies ``model`` for ``quant_config``: selects its layers and inserts observers where
    the method needs activation statistics. With example inputs (``args`` a tuple or a
    tensor, ``kwargs`` a dict) it runs them once. Works on a copy unless ``inplace=True``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    quantizer = _quantizer_for(quant_config)
    if getattr(model, _STATE, None) is not None:
        raise ValueError("this model is already prepared; call qkern.convert(model, config)")
    target = model if inplace else copy.deepcopy(model)
    quantizer.prepare(target)
    if quantizer.records_inputs():
        quantizer._record_hook = target.register_forward_pre_hook(quantizer._record,
                                                                  with_kwargs=True)
    object.__setattr__(target, _STATE, quantizer)  # not a submodule, not in the state dict
    if args is not None or kwargs is not None:
        a = tuple(args) if isinstance(args, (tuple, list)) else (() if args is None else (args,))
        run_calibration(target, [_Batch(a, dict(kwargs or {}))])
    return target


class _Batch:
    """Positional and keyword inputs together (prepare's args + kwargs)."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = args, kwargs


def convert(model: nn.Module, quant_config: BaseConfig | None = None) -> nn.Module:
    """Turns a prepared (and, for static methods, calibrated) model into its quantized form,
    in place on the prepared model, which it returns."""
    quantizer = getattr(model, _STATE, None)
    if quantizer is None:
        raise ValueError("convert() needs a prepared model: call qkern.prepare(model, config) "
                         "first (and run calibration data through it for static methods), or "
                         "use qkern.quantize_model(model, config, calibration)")
    if quant_config is not None and quant_config != quantizer.config:
        raise ValueError(f"the model was prepared with {quantizer.config!r}, not "
                         f"{quant_config!r}")
    hook = getattr(quantizer, "_record_hook", None)
    if hook is not None:  # convert() re-runs the recorded batches: stop recording
        hook.remove()
    why = quantizer.needs_calibration()
    if why and not quantizer.calibrated(model):
        raise ValueError(f"{type(quantizer.config).__name__} {why}, but the prepared model has "
                         "seen no data: run sample inputs through it before convert(), or pass "
                         "calibration= to qkern.quantize_model")
    quantizer.convert(model)
    object.__delattr__(model, _STATE)
    quantizer.warn_skipped()
    model.qkern_config = quantizer.config  # plain attribute: read by qkern.save
    return model


def quantize_model(model: nn.Module, quant_config: BaseConfig, calibration: Iterable | None = None,
                   inplace: bool = False, progress: bool = False) -> nn.Module:
    """``prepare`` + calibration + ``convert`` in one call. ``calibration``: an iterable of
    inputs (tensors, tuples of positional inputs, or dicts of keyword inputs)."""
    why = _quantizer_for(quant_config).needs_calibration()
    if why and calibration is None:
        raise ValueError(f"{type(quant_config).__name__} needs calibration data (it {why}): pass "
                         "calibration=[batch, ...] (a few hundred samples of real inputs)")
    prepared = prepare(model, quant_config, inplace=inplace)
    if calibration is not None:
        if run_calibration(prepared, calibration, progress) == 0 and why:
            raise ValueError("calibration is empty: it yielded no batches")
    return convert(prepared)
