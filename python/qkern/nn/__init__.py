"""Quantized modules."""

from .conv import QuantConv1d, QuantConv2d
from .dynamic_weight import DynamicWeightLinear
from .embedding import QuantEmbedding
from .linear import KernelFallbackWarning, QuantLinear, replace_linear

__all__ = ["DynamicWeightLinear", "KernelFallbackWarning", "QuantConv1d", "QuantConv2d",
           "QuantEmbedding", "QuantLinear", "replace_linear"]
