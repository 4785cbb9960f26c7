"""Quantization configs: one frozen-in-spirit dataclass per algorithm, validated in
``__post_init__`` (a wrong type or value raises ValueError naming the field) and round-tripped
through JSON (``to_json`` / ``BaseConfig.from_json``: the class name travels with the fields).

Which layers a config touches: ``include`` (None = every supported layer) and ``exclude``,
each a list of module-name fnmatch patterns (``"model.layers.*.mlp.*"``) or layer type names
(``"Linear"``, ``"Conv2d"``, ``"Embedding"``). ``overrides`` gives per-layer mixed precision:
``{name pattern: format name}`` or ``{name pattern: {field: value, ...}}``; the first pattern
that matches a layer wins, and a value of None keeps that layer in float.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .. import formats as QF

__all__ = ["ActivationOnlyConfig", "AdaRoundConfig", "BaseConfig", "DynamicConfig",
           "StaticConfig", "WeightOnlyConfig", "config_class"]

LAYER_TYPES = ("Linear", "Conv1d", "Conv2d", "Embedding")
_CONFIGS: dict[str, type[BaseConfig]] = {}


def config_class(cls):
    """Class decorator: makes a config known to ``BaseConfig.from_dict`` by its name."""
    _CONFIGS[cls.__name__] = cls
    return cls


def _fail(cls_name: str, name: str, want: str, got: Any) -> None:
    raise ValueError(f"{cls_name}.{name} must be {want}, got {got!r}")


@dataclass
class BaseConfig:
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)

    # the fields a per-layer override may set (besides the format shorthand)
    FORMAT_FIELD: ClassVar[str] = "fmt"

    def __post_init__(self) -> None:
        n = type(self).__name__
        if self.include is not None and not _str_list(self.include):
            _fail(n, "include", "None or a list of name patterns / layer type names",
                  self.include)
        if not _str_list(self.exclude):
            _fail(n, "exclude", "a list of name patterns / layer type names", self.exclude)
        self.include = None if self.include is None else list(self.include)
        self.exclude = list(self.exclude)
        if not isinstance(self.overrides, dict) or not all(
                isinstance(k, str) for k in self.overrides):
            _fail(n, "overrides", "a dict {name pattern: format name or dict of fields}",
                  self.overrides)
        own = {f.name for f in dataclasses.fields(self)} - {"include", "exclude", "overrides"}
        for pat, v in self.overrides.items():
            if v is None or isinstance(v, str):
                if isinstance(v, str):
                    _check_format(n, f"overrides[{pat!r}]", v)
                continue
            if not isinstance(v, dict):
                _fail(n, f"overrides[{pat!r}]", "None, a format name or a dict of fields", v)
            bad = set(v) - own
            if bad:
                raise ValueError(f"{n}.overrides[{pat!r}] sets unknown field(s) {sorted(bad)}; "
                                 f"fields: {sorted(own)}")
            self.for_layer(pat)  # validates the merged config now, not at convert time

    def for_layer(self, name: str) -> BaseConfig | None:
        """The config for one layer after ``overrides`` (None: keep it in float)."""
        import fnmatch

        for pat, v in self.overrides.items():
            if fnmatch.fnmatchcase(name, pat):
                if v is None:
                    return None
                changes = {self.FORMAT_FIELD: v} if isinstance(v, str) else dict(v)
                return dataclasses.replace(self, overrides={}, **changes)
        return self

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **dataclasses.asdict(self)}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @staticmethod
    def from_dict(d: dict) -> BaseConfig:
        if not isinstance(d, dict) or "type" not in d:
            raise ValueError("a config dict needs a 'type' naming its class")
        cls = _CONFIGS.get(d["type"])
        if cls is None:
            raise ValueError(f"unknown config type {d['type']!r}; known: {sorted(_CONFIGS)}")
        fields = {k: v for k, v in d.items() if k != "type"}
        names = {f.name for f in dataclasses.fields(cls)}
        if set(fields) - names:
            raise ValueError(f"{d['type']}: unknown field(s) {sorted(set(fields) - names)}")
        return cls(**fields)

    @staticmethod
    def from_json(s: str) -> BaseConfig:
        return BaseConfig.from_dict(json.loads(s))


def _str_list(v) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v)


def _check_format(cls_name: str, name: str, fmt) -> None:
    if not isinstance(fmt, str):
        _fail(cls_name, name, "a format name (str)", fmt)
    try:
        QF.get(fmt)
    except (KeyError, ValueError):
        raise ValueError(f"{cls_name}.{name}: unknown format {fmt!r}; known: "
                         f"{', '.join(QF.names())}") from None


def _check_group(cls_name: str, name: str, g) -> None:
    if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g <= 0):
        _fail(cls_name, name, "None (per channel) or a positive int", g)


def _check_choice(cls_name: str, name: str, v, options) -> None:
    if v not in options:
        _fail(cls_name, name, f"one of {options}", v)


def _check_bool(cls_name: str, name: str, v) -> None:
    if not isinstance(v, bool):
        _fail(cls_name, name, "a bool", v)


def _check_int(cls_name: str, name: str, v, lo: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        _fail(cls_name, name, f"an int >= {lo}", v)


def _check_real(cls_name: str, name: str, v, lo: float, hi: float, want: str) -> None:
    import math

    if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
            or not lo <= v <= hi):
        _fail(cls_name, name, want, v)


CLIP_SEARCHES = ("none", "output")


def _check_corrections(cfg) -> None:
    """The error-correction fields shared by WeightOnlyConfig and StaticConfig (README
    "Calibration and error correction")."""
    n = type(cfg).__name__
    _check_bool(n, "per_tensor", cfg.per_tensor)
    _check_bool(n, "cross_layer_equalization", cfg.cross_layer_equalization)
    _check_choice(n, "clip_search", cfg.clip_search, CLIP_SEARCHES)
    _check_bool(n, "bias_correction", cfg.bias_correction)
    if cfg.per_tensor and QF.get(cfg.fmt).block_size is not None:
        _fail(n, "per_tensor", f"False for the block format {cfg.fmt}", cfg.per_tensor)
    if cfg.clip_search != "none" and getattr(cfg, "double_quant", False):
        _fail(n, "clip_search", "'none' with double_quant=True", cfg.clip_search)


OBSERVER_NAMES = ("minmax", "moving_average", "percentile", "mse", "kl", "histogram")


@config_class
@dataclass
class WeightOnlyConfig(BaseConfig):
    """Weights quantized once (any qkern format, per channel or in groups along the input
    dim); activations stay float. Linear layers run qkern's fused kernels; Conv layers
    im2col onto the same kernels; Embedding rows are dequantized on lookup."""

    fmt: str = "int4"
    group_size: int | None = 128
    symmetric: bool = True
    mode: str = "exact"  # "fast": int8 activations per 32-block inside the int4 kernel
    rounding: str = "nearest_even"
    double_quant: bool = False  # nf4/fp4: bitsandbytes-style 8-bit block scales
    # error correction (correction.py); bias_correction and clip_search="output" need
    # calibration data
    per_tensor: bool = False  # one weight scale per layer (group_size is then ignored)
    cross_layer_equalization: bool = False
    clip_search: str = "none"  # "output": clip ratio minimising the layer's output error
    bias_correction: bool = False

    def __post_init__(self) -> None:
        n = type(self).__name__
        _check_format(n, "fmt", self.fmt)
        _check_group(n, "group_size", self.group_size)
        _check_bool(n, "symmetric", self.symmetric)
        _check_choice(n, "mode", self.mode, ("exact", "fast"))
        from ..quantize import ROUNDINGS

        _check_choice(n, "rounding", self.rounding, tuple(ROUNDINGS))
        _check_bool(n, "double_quant", self.double_quant)
        _check_corrections(self)
        super().__post_init__()


@config_class
@dataclass
class DynamicConfig(BaseConfig):
    """Weights int8 per output channel (static); activations quantized to int8 at every call
    from their own range: per token (one scale per row of x) or per tensor."""

    fmt: str = "int8"
    act_granularity: str = "per_token"
    FORMAT_FIELD: ClassVar[str] = "fmt"

    def __post_init__(self) -> None:
        n = type(self).__name__
        _check_choice(n, "fmt", self.fmt, ("int8",))
        _check_choice(n, "act_granularity", self.act_granularity, ("per_token", "per_tensor"))
        super().__post_init__()


@config_class
@dataclass
class ActivationOnlyConfig(BaseConfig):
    """Activations entering each selected layer quantized with a static range found in
    calibration (an observer); weights stay float."""

    act_fmt: str = "int8"
    observer: str = "minmax"
    act_symmetric: bool = False
    FORMAT_FIELD: ClassVar[str] = "act_fmt"

    def __post_init__(self) -> None:
        n = type(self).__name__
        _check_format(n, "act_fmt", self.act_fmt)
        _check_choice(n, "observer", self.observer, OBSERVER_NAMES)
        _check_bool(n, "act_symmetric", self.act_symmetric)
        super().__post_init__()


@config_class
@dataclass
class StaticConfig(BaseConfig):
    """Weights and activations static: weights quantized per output channel (or in groups),
    activation ranges from calibration. int8 weights with symmetric int8 activations run
    qkern's int8 x int8 -> int32 kernel (W8A8); other formats quantize-dequantize the
    activations on qkern's ops and run the weight kernel."""

    fmt: str = "int8"
    group_size: int | None = None
    symmetric: bool = True
    act_fmt: str = "int8"
    observer: str = "minmax"
    act_symmetric: bool = True
    # error correction (correction.py), all from the calibration data
    per_tensor: bool = False  # one weight scale per layer (group_size is then ignored)
    cross_layer_equalization: bool = False
    clip_search: str = "none"  # "output": clip ratio minimising the layer's output error
    bias_correction: bool = False
    progressive: bool = False  # calibrate layer by layer on the already-quantized prefix
    smoothing_alpha: float | None = None  # SmoothQuant migration strength (None: off)

    def __post_init__(self) -> None:
        n = type(self).__name__
        _check_format(n, "fmt", self.fmt)
        _check_group(n, "group_size", self.group_size)
        _check_bool(n, "symmetric", self.symmetric)
        _check_format(n, "act_fmt", self.act_fmt)
        _check_choice(n, "observer", self.observer, OBSERVER_NAMES)
        _check_bool(n, "act_symmetric", self.act_symmetric)
        _check_corrections(self)
        _check_bool(n, "progressive", self.progressive)
        if self.smoothing_alpha is not None:
            _check_real(n, "smoothing_alpha", self.smoothing_alpha, 0.0, 1.0,
                        "None or a number in [0, 1]")
            self.smoothing_alpha = float(self.smoothing_alpha)
        super().__post_init__()


@config_class
@dataclass
class AdaRoundConfig(BaseConfig):
    """Weight-only quantization with learned rounding (AdaRound, Nagel et al. 2020): per
    layer, each weight rounds up or down as a rectified-sigmoid variable trained to keep the
    layer's output on calibration inputs, then fixed. Integer formats, per output channel
    (``group_size=None``) or in groups along the input dim; calibration data is required."""

    fmt: str = "int4"
    group_size: int | None = None
    symmetric: bool = True
    # defaults for a few hundred steps (the paper: 10k-20k steps, lr 1e-3, lambda 0.01)
    iterations: int = 300  # Adam steps per layer
    lr: float = 5e-2
    batch_size: int = 256  # input rows (tokens / pixels) per step
    reg_weight: float = 0.3  # lambda of the rounding regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of the steps before the regulariser starts
    quantized_inputs: bool = True  # W~ sees the quantized prefix's inputs (paper, sec. 5)
    clip_search: str = "none"  # "output": scales from the output-error clip search first
    cross_layer_equalization: bool = False
    seed: int = 0
    verbose: bool = False

    def __post_init__(self) -> None:
        n = type(self).__name__
        _check_format(n, "fmt", self.fmt)
        f = QF.get(self.fmt)
        if f.kind != "int" or f.name == "ternary" or f.qmax - f.qmin < 1:
            _fail(n, "fmt", "an integer format (int2..int8, uint2..uint8)", self.fmt)
        _check_group(n, "group_size", self.group_size)
        _check_bool(n, "symmetric", self.symmetric)
        _check_int(n, "iterations", self.iterations, 1)
        _check_real(n, "lr", self.lr, 1e-12, 1e3, "a positive number")
        _check_int(n, "batch_size", self.batch_size, 1)
        _check_real(n, "reg_weight", self.reg_weight, 0.0, float("inf"), "a number >= 0")
        _check_real(n, "beta_start", self.beta_start, 1e-6, 1e6, "a positive number")
        _check_real(n, "beta_end", self.beta_end, 1e-6, 1e6, "a positive number")
        if self.beta_end > self.beta_start:
            _fail(n, "beta_end", f"<= beta_start ({self.beta_start})", self.beta_end)
        _check_real(n, "warmup", self.warmup, 0.0, 0.999, "a fraction in [0, 1)")
        _check_bool(n, "quantized_inputs", self.quantized_inputs)
        _check_choice(n, "clip_search", self.clip_search, CLIP_SEARCHES)
        _check_bool(n, "cross_layer_equalization", self.cross_layer_equalization)
        _check_int(n, "seed", self.seed, 0)
        _check_bool(n, "verbose", self.verbose)
        super().__post_init__()
