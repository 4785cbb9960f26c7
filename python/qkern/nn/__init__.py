"""Quantized modules."""

from .attention import Int8Attention
from .conv import QuantConv1d, QuantConv2d
from .dynamic_weight import DynamicWeightLinear
from .embedding import QuantEmbedding
from .hadamard import HadamardInput, HadamardOutput
from .integer import (
    FloatBoundary,
    IntegerAvgPool2d,
    IntegerConv2d,
    IntegerLinear,
    IntegerLinearIO,
    IntegerMaxPool2d,
    IntegerModel,
    IntegerReLU,
)
from .linear import (
    KernelFallbackWarning,
    QuantLinear,
    notify_quantized,
    on_quantized,
    replace_linear,
)
from .lowrank import CompensatedLinear, LowRankLinear, factor_layer, weight_bits

__all__ = ["CompensatedLinear", "DynamicWeightLinear", "FloatBoundary", "HadamardInput",
           "HadamardOutput", "Int8Attention", "IntegerAvgPool2d", "IntegerConv2d",
           "IntegerLinear", "IntegerLinearIO", "IntegerMaxPool2d", "IntegerModel", "IntegerReLU",
           "KernelFallbackWarning", "LowRankLinear", "QuantConv1d", "QuantConv2d",
           "QuantEmbedding", "QuantLinear", "factor_layer", "notify_quantized", "on_quantized",
           "replace_linear", "weight_bits"]
