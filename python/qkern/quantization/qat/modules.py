"""The training modules ``prepare`` swaps in for ``nn.Linear`` / ``nn.Conv2d``: the same weight
and bias ``Parameter`` objects as the float layer (an optimizer made before or after
``prepare`` on an in-place model trains them), a weight fake quantizer and an optional input
(activation) fake quantizer, whose learned scales are submodule parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import FakeQuant

__all__ = ["QATConv2d", "QATLinear", "fake_quantizers", "float_twin"]


class _QATMixin:
    weight_fake: FakeQuant
    input_fake: FakeQuant | None
    output_grad: nn.Module | None

    def _adopt(self, mod: nn.Module, weight_fake: FakeQuant,
               input_fake: FakeQuant | None, output_grad: nn.Module | None) -> None:
        self.weight = mod.weight  # the same Parameter objects
        self.bias = mod.bias
        self.weight_fake = weight_fake
        self.input_fake = input_fake
        self.output_grad = output_grad  # identity forward, quantizes the output's gradient

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.output_grad is None else self.output_grad(y)

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xq = x if self.input_fake is None else self.input_fake(x)
        return xq, self.weight_fake(self.weight)


class QATLinear(_QATMixin, nn.Linear):
    """``linear(input_fake(x), weight_fake(W), b)`` (through ``output_grad``, when given: an
    identity whose backward quantizes the gradient, DoReFa's gradient bits)."""

    def __init__(self, linear: nn.Linear, weight_fake: FakeQuant,
                 input_fake: FakeQuant | None = None, output_grad: nn.Module | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._adopt(linear, weight_fake, input_fake, output_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, w = self._inputs(x)
        return self._output(F.linear(xq, w, self.bias))


class QATConv2d(_QATMixin, nn.Conv2d):
    """``conv2d(input_fake(x), weight_fake(W), b)`` with the float layer's geometry."""

    def __init__(self, conv: nn.Conv2d, weight_fake: FakeQuant,
                 input_fake: FakeQuant | None = None, output_grad: nn.Module | None = None):
        nn.Module.__init__(self)
        for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                  "transposed", "output_padding", "groups", "padding_mode"):
            setattr(self, k, getattr(conv, k))
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self._adopt(conv, weight_fake, input_fake, output_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, w = self._inputs(x)
        return self._output(self._conv_forward(xq, w, self.bias))


def fake_quantizers(model: nn.Module) -> list[FakeQuant]:
    """Every fake quantizer inside ``model``."""
    return [m for m in model.modules() if isinstance(m, FakeQuant)]


def float_twin(mod: nn.Module, weight: torch.Tensor, bias: bool) -> nn.Linear | nn.Conv2d:
    """A plain ``nn.Linear`` / ``nn.Conv2d`` with ``mod``'s geometry holding ``weight`` (and
    ``mod``'s bias when ``bias``): what ``convert`` hands to QuantLinear / QuantConv2d's
    ``from_float``."""
    if isinstance(mod, nn.Linear):
        f = nn.Linear(mod.in_features, mod.out_features, bias=bias)
    else:
        f = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride,
                      mod.padding, mod.dilation, bias=bias)
    with torch.no_grad():
        f.weight.copy_(weight)
        if bias:
            f.bias.copy_(mod.bias.detach())
    return f
