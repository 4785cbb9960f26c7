"""The model variants the decode benches compare: fp32, torch's dynamic int8 Linear, qkern's
QuantLinear replacing every nn.Linear, and VQLinear layers of random codes and codebooks (GPTVQ's
layout: speed only, these carry no quality)."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ...nn import QuantLinear, replace_linear
from ...vq.linear import VQLinear

__all__ = ["build", "kernels_of", "random_vq"]


def random_vq(model: nn.Module, dim: int, bits: float, group_rows: int | None,
              seed: int = 0, mode: str = "exact") -> nn.Module:
    """A copy of ``model`` with every nn.Linear a VQLinear of its shape: random codes of
    ``bits * dim`` bits per vector (uint8), random float16 codebooks (one per ``group_rows``
    rows, or per layer), no scales. For timing: the kernels do the same work whatever the
    values. ``mode``: VQLinear's ("fast": the int8 kernel)."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    kc = 2 ** round(bits * dim)
    for name, lin in [(n, m) for n, m in out.named_modules() if isinstance(m, nn.Linear)]:
        o, k = lin.weight.shape
        rows = group_rows or o
        codes = torch.randint(0, kc, (o, k // dim), generator=g).to(torch.uint8)
        books = (0.02 * torch.randn(-(-o // rows), kc, dim, generator=g)).half()
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child,
                VQLinear(codes, books, None, lin.bias, rows, mode=mode))
    return out


def build(model: nn.Module, spec: dict | str | None) -> nn.Module:
    if spec is None:
        return model
    if isinstance(spec, dict) and "vq" in spec:
        return random_vq(model, **spec["vq"])
    if spec == "torch":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return replace_linear(model, spec)


def kernels_of(model: nn.Module) -> str:
    names = sorted({m.kernel for m in model.modules() if isinstance(m, QuantLinear)} |
                   {"gemm_vq8" if m.fast_active else "gemm_vq" for m in model.modules()
                    if isinstance(m, VQLinear)})
    return ", ".join(names) if names else "-"
