"""``qkern::fwht``: the normalized fast Walsh-Hadamard transform over the last dimension,
``y = x H_n / sqrt(n)`` with ``H_n`` the Sylvester Hadamard matrix (``H_1 = [1]``,
``H_2k = [[H_k, H_k], [H_k, -H_k]]``), ``n`` a power of two; O(n log n) per row
(csrc/cpu/hadamard/api.h). ``x`` is float32, bfloat16 or float16 (computed in float32); the
result has ``x``'s shape and dtype.

Autograd: ``H_n / sqrt(n)`` is symmetric and orthogonal, so the transform is its own inverse
and its own transpose: ``grad_x = fwht(grad_y)``.
"""

from __future__ import annotations

import torch

from .. import _C
from . import checks
from .raw import contig, ptr
from .schemas import LIB

__all__ = ["fwht"]


def fwht(x: torch.Tensor) -> torch.Tensor:
    checks.fwht(x)
    xf = contig(x, torch.float32)
    y = torch.empty(x.shape, dtype=torch.float32)
    n = x.shape[-1]
    _C.fwht_raw(ptr(xf), ptr(y), y.numel() // n, n)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    return torch.ops.qkern.fwht(grad)


LIB.impl("fwht", fwht, "CPU")
torch.library.register_autograd("qkern::fwht", _backward)
