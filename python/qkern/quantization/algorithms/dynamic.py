"""Dynamic PTQ: int8 weights per output channel, activations quantized to int8 at every call
from their own range."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..constraints import check_dynamic_activations
from ..layers import weight_module
from ..registry import BaseConfig, Quantizer, check_choice, config_class, register_quantizer

__all__ = ["DynamicConfig", "DynamicQuantizer"]


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
        check_choice(n, "fmt", self.fmt, ("int8",))
        check_choice(n, "act_granularity", self.act_granularity, ("per_token", "per_tensor"))
        super().__post_init__()


@register_quantizer(DynamicConfig)
class DynamicQuantizer(Quantizer):
    SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
    APPLIES_CONSTRAINTS = True

    def prepare(self, model: nn.Module) -> None:
        check_dynamic_activations(self.config.constraints,
                                  self.config.act_granularity == "per_token", "DynamicConfig",
                                  "use StaticConfig (power-of-two scales) or "
                                  "act_granularity='per_tensor' (per_tensor)")
        super().prepare(model)

    def convert(self, model: nn.Module) -> None:
        for name, cfg in self.plan:
            act = "int8_dynamic" if cfg.act_granularity == "per_token" else "int8_dynamic_tensor"
            mod = model.get_submodule(name)
            self.swap(model, name, lambda: weight_module(mod, cfg.fmt, None, {}, name,
                                                         act=act, constraints=cfg.constraints))
