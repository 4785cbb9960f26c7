"""The core of the quantization workflow: configs, quantizers and the registry joining them.

A config is a dataclass (``@config_class``, validated in ``__post_init__``: a wrong type or
value raises ValueError naming the field) round-tripped through JSON (``to_json`` /
``BaseConfig.from_json``: the class name travels with the fields). A :class:`Quantizer` is
one algorithm, registered for its config with ``@register_quantizer(ConfigCls)``;
``prepare`` and ``convert`` dispatch on ``type(quant_config)`` (:func:`quantizer_for`).

Which layers a config touches: ``include`` (None = every supported layer) and ``exclude``,
each a list of module-name fnmatch patterns (``"model.layers.*.mlp.*"``) or layer type names
(``"Linear"``, ``"Conv2d"``, ``"Embedding"``). ``overrides`` gives per-layer mixed precision:
``{name pattern: format name}`` or ``{name pattern: {field: value, ...}}``; the first pattern
that matches a layer wins, and a value of None keeps that layer in float.

The ``check_*`` helpers validate config fields with the same messages for every config.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .. import formats as QF
from .._checks import warn_user
from .constraints import HardwareConstraints

__all__ = ["LAYER_TYPES", "BaseConfig", "Batch", "Quantizer", "any_layer", "check_bool",
           "check_choice", "check_format", "check_group", "check_int", "check_real",
           "clone_inputs", "config_class", "fail", "matches", "quantizer_for", "register_quantizer",
           "registered_configs", "registered_quantizers", "replace_module",
           "weight_layers"]

LAYER_TYPES = ("Linear", "Conv1d", "Conv2d", "Embedding")
_CONFIGS: dict[str, type[BaseConfig]] = {}
_QUANTIZERS: dict[type, type[Quantizer]] = {}


# ---- configs ---------------------------------------------------------------------------------


def config_class(cls):
    """Class decorator: makes a config known to ``BaseConfig.from_dict`` by its name."""
    _CONFIGS[cls.__name__] = cls
    return cls


def fail(cls_name: str, name: str, want: str, got: Any) -> None:
    """Raises the ValueError of a bad config field: ``Cls.name must be <want>, got <got>``."""
    raise ValueError(f"{cls_name}.{name} must be {want}, got {got!r}")


@dataclass
class BaseConfig:
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    #: what the target hardware supports (quantization/constraints.py); None: no limits
    constraints: HardwareConstraints | None = None

    # the fields a per-layer override may set (besides the format shorthand)
    FORMAT_FIELD: ClassVar[str] = "fmt"

    def __post_init__(self) -> None:
        n = type(self).__name__
        if self.include is not None and not _str_list(self.include):
            fail(n, "include", "None or a list of name patterns / layer type names",
                 self.include)
        if not _str_list(self.exclude):
            fail(n, "exclude", "a list of name patterns / layer type names", self.exclude)
        self.include = None if self.include is None else list(self.include)
        self.exclude = list(self.exclude)
        self.constraints = HardwareConstraints.coerce(self.constraints)
        if not isinstance(self.overrides, dict) or not all(
                isinstance(k, str) for k in self.overrides):
            fail(n, "overrides", "a dict {name pattern: format name or dict of fields}",
                 self.overrides)
        own = {f.name for f in dataclasses.fields(self)} - {"include", "exclude", "overrides"}
        for pat, v in self.overrides.items():
            if v is None or isinstance(v, str):
                if isinstance(v, str):
                    check_format(n, f"overrides[{pat!r}]", v)
                continue
            if not isinstance(v, dict):
                fail(n, f"overrides[{pat!r}]", "None, a format name or a dict of fields", v)
            bad = set(v) - own
            if bad:
                raise ValueError(f"{n}.overrides[{pat!r}] sets unknown field(s) {sorted(bad)}; "
                                 f"fields: {sorted(own)}")
            self.for_layer(pat)  # validates the merged config now, not at convert time

    def for_layer(self, name: str) -> BaseConfig | None:
        """The config for one layer after ``overrides`` (None: keep it in float)."""
        for pat, v in self.overrides.items():
            if fnmatch.fnmatchcase(name, pat):
                if v is None:
                    return None
                changes = {self.FORMAT_FIELD: v} if isinstance(v, str) else dict(v)
                return dataclasses.replace(self, overrides={}, **changes)
        return self

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The fields, with the class name under ``type``; a nested config (the ``then``
        field of the LLM transforms) becomes its own dict."""
        out = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = (v.to_dict() if isinstance(v, (BaseConfig, HardwareConstraints))
                           else copy.deepcopy(v))
        return out

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @staticmethod
    def from_dict(d: dict) -> BaseConfig:
        if not isinstance(d, dict) or "type" not in d:
            raise ValueError("a config dict needs a 'type' naming its class")
        cls = _CONFIGS.get(d["type"])
        if cls is None:
            raise ValueError(f"unknown config type {d['type']!r}; known: {sorted(_CONFIGS)}")
        fields = {k: (BaseConfig.from_dict(v) if isinstance(v, dict) and v.get("type") in
                      _CONFIGS else v) for k, v in d.items() if k != "type"}
        names = {f.name for f in dataclasses.fields(cls)}
        if set(fields) - names:
            raise ValueError(f"{d['type']}: unknown field(s) {sorted(set(fields) - names)}")
        return cls(**fields)

    @staticmethod
    def from_json(s: str) -> BaseConfig:
        return BaseConfig.from_dict(json.loads(s))


def any_layer(cfg: BaseConfig, pred: Callable[[BaseConfig], bool]) -> bool:
    """``pred`` holds for the config or for a per-layer override of it."""
    cfgs = [cfg] + [dataclasses.replace(cfg, overrides={}, **v)
                    for v in cfg.overrides.values() if isinstance(v, dict)]
    return any(pred(c) for c in cfgs)


# ---- field validation ------------------------------------------------------------------------


def _str_list(v) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v)


def check_format(cls_name: str, name: str, fmt) -> None:
    if not isinstance(fmt, str):
        fail(cls_name, name, "a format name (str)", fmt)
    try:
        QF.get(fmt)
    except (KeyError, ValueError):
        raise ValueError(f"{cls_name}.{name}: unknown format {fmt!r}; known: "
                         f"{', '.join(QF.names())}") from None


def check_group(cls_name: str, name: str, g) -> None:
    if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0):
        fail(cls_name, name, "None (per channel) or a positive int", g)


def check_choice(cls_name: str, name: str, v, options) -> None:
    if v not in options:
        fail(cls_name, name, f"one of {options}", v)


def check_bool(cls_name: str, name: str, v) -> None:
    if not isinstance(v, bool):
        fail(cls_name, name, "a bool", v)


def check_int(cls_name: str, name: str, v, lo: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        fail(cls_name, name, f"an int >= {lo}", v)


def check_real(cls_name: str, name: str, v, lo: float, hi: float, want: str) -> None:
    if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
            or not lo <= v <= hi):
        fail(cls_name, name, want, v)


# ---- quantizers ------------------------------------------------------------------------------


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


def registered_quantizers() -> dict[type[BaseConfig], type[Quantizer]]:
    """{config class: quantizer class} of every registered algorithm (a copy)."""
    return dict(_QUANTIZERS)


def registered_configs() -> dict[str, type[BaseConfig]]:
    """{class name: config class} of every ``@config_class`` (what ``from_dict`` knows)."""
    return dict(_CONFIGS)


def quantizer_for(config) -> Quantizer:
    """A new quantizer for ``config``, of the class registered for ``type(config)``."""
    if not isinstance(config, BaseConfig):
        raise TypeError(f"quant_config must be a qkern config (e.g. qkern.WeightOnlyConfig()), "
                        f"got {type(config).__name__}")
    cls = _QUANTIZERS.get(type(config))
    if cls is None:
        raise ValueError(f"no quantizer is registered for {type(config).__name__}; register "
                         "one with @qkern.quantization.register_quantizer")
    return cls(config)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules holding a weight matrix or kernel of their own (a parameter with >= 2 dims):
    the layers a quantizer may take; norms and biases are not among them."""
    out = []
    for name, mod in model.named_modules():
        if name and any(p.dim() >= 2 for p in mod.parameters(recurse=False)):
            out.append((name, mod))
    return out


def matches(name: str, mod: nn.Module, patterns: Iterable[str]) -> bool:
    """True when ``name`` matches a pattern (fnmatch) or ``mod``'s class name is one."""
    return any(p == type(mod).__name__ or fnmatch.fnmatchcase(name, p) for p in patterns)


class Batch:
    """Positional and keyword inputs together (prepare's args + kwargs, a recorded batch)."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = args, kwargs


def clone_inputs(v):
    """Tensors inside (nested) tuples / lists / dicts detached and copied, so a caller that
    reuses its input buffers does not change the recorded batches."""
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (tuple, list)):
        return type(v)(clone_inputs(x) for x in v)
    if isinstance(v, dict):
        return {k: clone_inputs(x) for k, x in v.items()}
    return v


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` where the submodule ``name`` of ``model`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class Quantizer:
    """One algorithm. ``prepare(model)`` and ``convert(model)`` work in place on the model
    they are given (the API functions take care of copying the user's model)."""

    #: layer types this quantizer converts (exact types: subclasses such as
    #: MultiheadAttention's out_proj are not assumed to behave like their base)
    SUPPORTED: tuple[type, ...] = (nn.Linear,)
    #: True when convert() needs calibration data seen after prepare()
    NEEDS_CALIBRATION = False
    #: True when convert() applies ``config.constraints``; a config with constraints given
    #: to a quantizer that does not is refused in prepare() rather than silently ignored
    APPLIES_CONSTRAINTS = False

    def __init__(self, config: BaseConfig):
        self.config = config
        self.plan: list[tuple[str, BaseConfig]] = []  # (layer name, its config)
        self.skipped: dict[str, str] = {}  # layer name -> why it stays float
        #: the model inputs seen between prepare() and convert(), kept (cloned) when
        #: records_inputs() is True, for methods that re-run calibration inside convert()
        self.batches: list[Batch] = []
        #: the hook handle of ``record`` (set by ``prepare``, removed by ``convert``)
        self.record_handle: torch.utils.hooks.RemovableHandle | None = None

    def needs_calibration(self) -> str | None:
        """Why convert() needs calibration data (None: it does not)."""
        if self.NEEDS_CALIBRATION:
            return "quantizes activations with ranges from calibration"
        return None

    def records_inputs(self) -> bool:
        """True when prepare() should keep every calibration batch for convert()."""
        return False

    def record(self, module, args, kwargs) -> None:
        """The forward pre-hook (with kwargs) filling ``batches``."""
        self.batches.append(Batch(clone_inputs(args), clone_inputs(kwargs)))

    def select(self, model: nn.Module) -> None:
        """Fills ``plan`` from include / exclude / overrides; unsupported layers that the
        config would have taken go to ``skipped``."""
        cfg = self.config
        for name, mod in weight_layers(model):
            if cfg.include is not None and not matches(name, mod, cfg.include):
                continue
            if matches(name, mod, cfg.exclude):
                continue
            layer_cfg = cfg.for_layer(name)
            if layer_cfg is None:
                continue
            if layer_cfg.constraints is not None and not self.APPLIES_CONSTRAINTS:
                raise ValueError(f"{type(self).__name__} does not apply hardware constraints "
                                 f"(layer {name}); use WeightOnlyConfig, StaticConfig or "
                                 "DynamicConfig (LLMs: RTN, GPTQ, AWQ, HQQ), or "
                                 "constraints=None")
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

    def swap(self, model: nn.Module, name: str, make, float_mod: nn.Module | None = None):
        """Replaces layer ``name`` by ``make()``; a layer the build rejects (ValueError: a
        shape its format cannot take...) goes back to ``float_mod`` (or stays as it is) and is
        listed in the warning, so a model is never half-quantized silently."""
        try:
            new = make()
        except ValueError as e:
            self.skipped[name] = str(e)
            if float_mod is not None:
                replace_module(model, name, float_mod)
            return
        replace_module(model, name, new)

    def warn_skipped(self) -> None:
        if self.skipped:
            lines = "\n".join(f"  {n}: {why}" for n, why in self.skipped.items())
            warn_user(f"{len(self.skipped)} layer(s) left in float:\n{lines}")
