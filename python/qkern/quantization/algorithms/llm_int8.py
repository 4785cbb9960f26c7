"""LLM.int8() (Dettmers et al. 2022): vector-wise int8 quantization with mixed-precision
decomposition. No calibration: each Linear becomes a QuantLinear with int8 weights per output
channel (row-wise absmax / 127, as bitsandbytes' vector-wise quantization) on the
``w8a8_mixed`` kernel, which at every call finds the outlier feature dimensions of its input
(columns with any ``|x_ij| >= threshold``), runs the other columns as per-token int8 x int8 ->
int32 (rescaled by the row and column scales) and adds the outlier columns in float against
the same columns of the dequantized int8 weight: the weights stay int8 (ops/w8mixed.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from ..layers import weight_module
from ..registry import BaseConfig, Quantizer, check_choice, config_class, fail, register_quantizer

__all__ = ["LLMInt8Config", "LLMInt8Quantizer"]


@config_class
@dataclass
class LLMInt8Config(BaseConfig):
    """``threshold``: the outlier magnitude (the paper's alpha = 6.0, bitsandbytes'
    ``llm_int8_threshold``); 0 computes every column in float, ``math.inf`` none (plain
    per-token W8A8). ``lm_head`` and the embeddings stay float by default (``exclude``), as in
    bitsandbytes."""

    threshold: float = 6.0
    fmt: str = "int8"
    exclude: list[str] = field(default_factory=lambda: ["lm_head", "Embedding"])
    FORMAT_FIELD: ClassVar[str] = "fmt"

    def __post_init__(self) -> None:
        check_choice(type(self).__name__, "fmt", self.fmt, ("int8",))
        t = self.threshold
        if (isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0):
            fail(type(self).__name__, "threshold", "a number >= 0 (inf: no outliers)", t)
        self.threshold = float(t)
        super().__post_init__()


@register_quantizer(LLMInt8Config)
class LLMInt8Quantizer(Quantizer):
    SUPPORTED = (nn.Linear,)

    def convert(self, model: nn.Module) -> None:
        for name, cfg in self.plan:
            mod = model.get_submodule(name)
            self.swap(model, name, lambda: weight_module(mod, "int8", None, {}, name,
                                                         act="int8_mixed",
                                                         threshold=cfg.threshold))
