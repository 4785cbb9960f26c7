"""Online Hadamard rotations around a layer (QuaRot, arXiv:2404.00456): the activation is
rotated at run time by ``R = diag(signs) H_n^T / sqrt(n)`` (the transpose of
``qkern.hadamard.random_hadamard``'s ``Q``: the signs act first, then the transform mixes
them) with the fast transform (``hadamard_transform(x, signs, transpose=True)``: the FWHT
kernel, O(n log n) per row), and the adjacent weight holds the matching ``R`` folded in, so the
pair computes what the float layer computed while the quantized weight and its input
activations see the rotated, outlier-free basis.

- :class:`HadamardInput`: ``y = linear(x R)``; ``linear``'s weight is ``W R`` (its input
  columns rotated): ``(x R)(W R)^T = x W^T``.
- :class:`HadamardOutput`: ``y = module(x) R`` (after a weight-free RMSNorm, whose output
  the following linears read through their ``W R`` weights).
"""

from __future__ import annotations

import torch
from torch import nn

from ..hadamard import base_order, hadamard_transform

__all__ = ["HadamardInput", "HadamardOutput", "rotate"]


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x R`` over the last dimension, ``R = diag(signs) H_n^T / sqrt(n)`` (orthogonal)."""
    return hadamard_transform(x, signs, transpose=True)


def _signs(signs: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(signs).detach().to(torch.float32).reshape(-1).clone()
    if s.numel() == 0 or not bool(((s == 1) | (s == -1)).all()):
        raise ValueError("signs must be a non-empty vector of +1 / -1")
    base_order(s.numel())  # ValueError when no Hadamard matrix of this size is available
    return s


class HadamardInput(nn.Module):
    """``linear(x R)`` with ``R = diag(signs) H_n^T / sqrt(n)``, ``n = linear``'s input
    size."""

    def __init__(self, linear: nn.Module, signs: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("signs", _signs(signs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(rotate(x, self.signs))

    def extra_repr(self) -> str:
        return f"n={self.signs.numel()}"


class HadamardOutput(nn.Module):
    """``module(x) R`` with ``R = diag(signs) H_n^T / sqrt(n)``, ``n`` the output's last
    size."""

    def __init__(self, module: nn.Module, signs: torch.Tensor):
        super().__init__()
        self.module = module
        self.register_buffer("signs", _signs(signs))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return rotate(self.module(*args, **kwargs), self.signs)

    def extra_repr(self) -> str:
        return f"n={self.signs.numel()}"
