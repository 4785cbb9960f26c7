"""Activation-only PTQ: the input of each selected layer quantized with a static range from
calibration; weights stay float."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..layers import OBSERVER_NAMES, ActQuant, ObservingQuantizer
from ..registry import (
    BaseConfig,
    check_bool,
    check_choice,
    check_format,
    config_class,
    register_quantizer,
    replace_module,
)

__all__ = ["ActivationOnlyConfig", "ActivationOnlyQuantizer"]


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
        check_format(n, "act_fmt", self.act_fmt)
        check_choice(n, "observer", self.observer, OBSERVER_NAMES)
        check_bool(n, "act_symmetric", self.act_symmetric)
        super().__post_init__()


@register_quantizer(ActivationOnlyConfig)
class ActivationOnlyQuantizer(ObservingQuantizer):
    def convert(self, model: nn.Module) -> None:
        for name, cfg in self.plan:
            mod, scale, zp = self.observed(model, name)
            replace_module(model, name, ActQuant(mod, cfg.act_fmt, scale, zp))
