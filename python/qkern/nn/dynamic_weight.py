"""DynamicWeightLinear: a Linear layer that keeps its float weight and quantizes it at every
call ("weight-only dynamic" quantization): in-place weight updates (training, LoRA merges,
weight surgery) show up in the next call, and the weight gets the clipped straight-through
gradient of ``qkern.fake_quantize``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import formats as QF
from ..quantize import ROUNDINGS, fake_quantize, quantize
from ..tensor import QTensor

__all__ = ["DynamicWeightLinear"]


class DynamicWeightLinear(nn.Module):
    """``y = x @ Q(W)^T + b``, with ``Q(W) = dequantize(quantize(W, fmt, ...))`` recomputed from
    the float ``weight`` (a Parameter) at every forward: per output channel when
    ``group_size`` is None (block formats: their own block), else groups of ``group_size``
    along the input dimension; ``symmetric`` / ``rounding`` as in ``qkern.quantize``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str = "int8",
                 group_size: int | None = None, symmetric: bool = True,
                 rounding: str = "nearest_even"):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a 2-D (out, in) tensor")
        if rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")
        self.fmt = QF.get(fmt).name
        self.group_size, self.symmetric, self.rounding = group_size, symmetric, rounding
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.quantized_weight()  # refuses a format / group / symmetry the weight cannot take

    @classmethod
    def from_float(cls, linear: nn.Linear, fmt: str = "int8", *, group_size: int | None = None,
                   symmetric: bool = True, rounding: str = "nearest_even"
                   ) -> DynamicWeightLinear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, fmt, group_size, symmetric, rounding)

    def quant_kwargs(self) -> dict:
        """The ``qkern.quantize`` keywords applied to the weight at each call."""
        f = QF.get(self.fmt)
        kw: dict = {"symmetric": self.symmetric, "rounding": self.rounding}
        if self.group_size is None and f.block_size is None:
            kw.update(granularity="channel", axis=0)
        else:
            g = self.group_size if self.group_size is not None else f.block_size
            if self.in_features % g:
                raise ValueError(f"group_size={g} does not divide in_features="
                                 f"{self.in_features}")
            kw.update(granularity="group", axis=1, group_size=g)
        return kw

    def quantized_weight(self) -> QTensor:
        """The weight as it is now, quantized (what the next forward computes with)."""
        return quantize(self.weight.detach(), self.fmt, **self.quant_kwargs())

    def dequantize_weight(self) -> torch.Tensor:
        return self.quantized_weight().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"DynamicWeightLinear takes a floating-point input, got {what}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dim {self.in_features}, got {x.shape[-1]}")
        w = fake_quantize(self.weight, self.fmt, **self.quant_kwargs())
        y = F.linear(x.float(), w, self.bias)
        return y.to(x.dtype) if x.dtype != y.dtype else y

    def extra_repr(self) -> str:
        gran = "per channel" if self.group_size is None else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.fmt}, {gran}, symmetric={self.symmetric}, "
                f"bias={self.bias is not None}, quantized at every call")
