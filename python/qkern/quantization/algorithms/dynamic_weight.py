"""Weight-only dynamic quantization: weights kept in float and quantized on the fly at every
call (:class:`~qkern.nn.DynamicWeightLinear`), activations float. Useful while the weights
still change (quantization-aware fine-tuning through the straight-through estimator, LoRA
merges) or to try a format without committing the model to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ...nn import DynamicWeightLinear
from ...quantize import ROUNDINGS
from ..registry import (
    BaseConfig,
    Quantizer,
    check_bool,
    check_choice,
    check_format,
    check_group,
    config_class,
    register_quantizer,
)

__all__ = ["DynamicWeightOnlyConfig", "DynamicWeightOnlyQuantizer"]


@config_class
@dataclass
class DynamicWeightOnlyConfig(BaseConfig):
    """Every selected nn.Linear becomes a DynamicWeightLinear: ``fmt`` (any qkern weight
    format), per output channel when ``group_size`` is None (block formats: their block),
    ``symmetric`` or with zero points, ``rounding`` as in ``qkern.quantize``."""

    fmt: str = "int8"
    group_size: int | None = None
    symmetric: bool = True
    rounding: str = "nearest_even"
    FORMAT_FIELD: ClassVar[str] = "fmt"

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_format(n, "fmt", self.fmt)
        check_group(n, "group_size", self.group_size)
        check_bool(n, "symmetric", self.symmetric)
        check_choice(n, "rounding", self.rounding, tuple(ROUNDINGS))
        super().__post_init__()


@register_quantizer(DynamicWeightOnlyConfig)
class DynamicWeightOnlyQuantizer(Quantizer):
    SUPPORTED = (nn.Linear,)

    def convert(self, model: nn.Module) -> None:
        for name, cfg in self.plan:
            mod = model.get_submodule(name)
            self.swap(model, name, lambda: DynamicWeightLinear.from_float(
                mod, cfg.fmt, group_size=cfg.group_size, symmetric=cfg.symmetric,
                rounding=cfg.rounding))
