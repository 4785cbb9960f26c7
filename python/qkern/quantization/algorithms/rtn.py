"""Round to nearest (RTN): the baseline of the LLM methods. Each linear of each transformer
block quantized on qkern's integer grid (``int{bits}``, per output channel or in groups along
the input dim, symmetric or with zero points), block by block through the sequential
pipeline: no data needed; with calibration data the per-layer log shows each layer's
relative output error."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import BaseConfig, config_class, register_quantizer
from ..sequential import SequentialQuantizer, check_weight_bits

__all__ = ["RTNConfig", "RTNQuantizer"]


@config_class
@dataclass
class RTNConfig(BaseConfig):
    """Round-to-nearest weights: ``bits`` in 2..8, ``group_size`` (None: per output
    channel), ``sym`` (False: a zero point per group). Embeddings and the LM head stay float;
    only the linears inside transformer blocks are quantized."""

    bits: int = 4
    group_size: int | None = 128
    sym: bool = True

    def __post_init__(self) -> None:
        check_weight_bits(self)
        super().__post_init__()


@register_quantizer(RTNConfig)
class RTNQuantizer(SequentialQuantizer):
    GRAMS = False
    APPLIES_CONSTRAINTS = True
    NEEDS_DATA = False
