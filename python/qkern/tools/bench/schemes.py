"""The model variants the decode benches compare: fp32, torch's dynamic int8 Linear, and
qkern's QuantLinear replacing every nn.Linear."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ...nn import QuantLinear, replace_linear

__all__ = ["build", "kernels_of"]


def build(model: nn.Module, spec: dict | str | None) -> nn.Module:
    if spec is None:
        return model
    if spec == "torch":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return replace_linear(model, spec)


def kernels_of(model: nn.Module) -> str:
    names = sorted({m.kernel for m in model.modules() if isinstance(m, QuantLinear)})
    return ", ".join(names) if names else "-"
