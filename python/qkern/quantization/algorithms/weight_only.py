"""Weight-only PTQ: weights quantized once (any qkern format, per channel or in groups),
activations stay float. Also the error-correction options it shares with StaticConfig
(:func:`check_corrections`, :func:`wants_data`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ... import formats as QF
from ...quantize import ROUNDINGS
from ..calibration import collect_grams, float_copy
from ..layers import warn_notes, weight_module
from ..registry import (
    BaseConfig,
    Quantizer,
    any_layer,
    check_bool,
    check_choice,
    check_format,
    check_group,
    config_class,
    fail,
    register_quantizer,
)
from .bias_correction import bias_correction
from .clip_search import CLIP_SEARCHES, weight_params
from .equalization import equalize

__all__ = ["WeightOnlyConfig", "WeightOnlyQuantizer", "check_corrections", "wants_data"]


def check_corrections(cfg) -> None:
    """The error-correction fields shared by WeightOnlyConfig and StaticConfig (README
    "Calibration and error correction")."""
    n = type(cfg).__name__
    check_bool(n, "per_tensor", cfg.per_tensor)
    check_bool(n, "cross_layer_equalization", cfg.cross_layer_equalization)
    check_choice(n, "clip_search", cfg.clip_search, CLIP_SEARCHES)
    check_bool(n, "bias_correction", cfg.bias_correction)
    if cfg.per_tensor and QF.get(cfg.fmt).block_size is not None:
        fail(n, "per_tensor", f"False for the block format {cfg.fmt}", cfg.per_tensor)
    if cfg.clip_search != "none" and getattr(cfg, "double_quant", False):
        fail(n, "clip_search", "'none' with double_quant=True", cfg.clip_search)


def wants_data(c) -> bool:
    """True when a layer config's corrections measure outputs on calibration data."""
    return c.bias_correction or c.clip_search == "output"


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
    # error correction (equalization, clip_search, bias_correction modules); bias_correction
    # and clip_search="output" need calibration data
    per_tensor: bool = False  # one weight scale per layer (group_size is then ignored)
    cross_layer_equalization: bool = False
    clip_search: str = "none"  # "output": clip ratio minimising the layer's output error
    bias_correction: bool = False

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_format(n, "fmt", self.fmt)
        check_group(n, "group_size", self.group_size)
        check_bool(n, "symmetric", self.symmetric)
        check_choice(n, "mode", self.mode, ("exact", "fast"))
        check_choice(n, "rounding", self.rounding, tuple(ROUNDINGS))
        check_bool(n, "double_quant", self.double_quant)
        check_corrections(self)
        super().__post_init__()


@register_quantizer(WeightOnlyConfig)
class WeightOnlyQuantizer(Quantizer):
    APPLIES_CONSTRAINTS = True
    SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)

    def prepare(self, model: nn.Module) -> None:
        equalize(model, self.config)
        super().prepare(model)

    def records_inputs(self) -> bool:
        return any_layer(self.config, wants_data)

    def needs_calibration(self) -> str | None:
        if self.records_inputs():
            return ("measures layer outputs on calibration data (bias_correction=True or "
                    "clip_search='output')")
        return None

    def calibrated(self, model: nn.Module) -> bool:
        return bool(self.batches) or not self.records_inputs()

    def convert(self, model: nn.Module) -> None:
        notes: dict[str, str] = {}
        batches = self.batches
        fixed = [n for n, c in self.plan if c.bias_correction]
        float_ref = float_copy(model) if fixed else None
        search = [n for n, c in self.plan if c.clip_search == "output"
                  and not isinstance(model.get_submodule(n), nn.Embedding)]
        grams = collect_grams(model, search, batches) if search else {}
        for name, cfg in self.plan:
            mod = model.get_submodule(name)
            kw = {"symmetric": cfg.symmetric, "rounding": cfg.rounding}
            if cfg.double_quant:
                kw["double_quant"] = True
            if not isinstance(mod, nn.Embedding):
                kw["mode"] = cfg.mode
            params = weight_params(cfg, grams.get(name), notes, name)
            group = None if cfg.per_tensor else cfg.group_size
            self.swap(model, name, lambda: weight_module(mod, cfg.fmt, group, notes, name,
                                                         params=params,
                                                         constraints=cfg.constraints, **kw))
        if fixed:
            bias_correction(float_ref, model, batches,
                            layers=[n for n in fixed if n not in self.skipped])
        self.notes = notes
        warn_notes(notes)
