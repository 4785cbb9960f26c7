"""Quantized SVD: a Linear's weight as ``L R``, the rank-``r`` truncated SVD split evenly
(``L = U_r sqrt(S_r)``, ``R = sqrt(S_r) V_r^T``), each factor quantized with
:func:`qkern.quantize` (through :class:`~qkern.nn.QuantLinear`); the rank either given or the
largest whose storage fits a budget in bits per weight of the original matrix.

Storage (:func:`factor_bits`, equal to :func:`qkern.nn.weight_bits` of the built layer):
codes at the format's width, a float16 scale per group (plus a zero point of the code width
when asymmetric); each factor is grouped along its own input dim, per output channel where
the group size does not divide it; float factors count 16 bits per value.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import formats as QF
from ..nn import LowRankLinear
from ..quantization import BaseConfig
from ..quantization.algorithms.low_rank import svd_factors
from ..quantization.registry import check_int, matches

__all__ = ["decompose_model", "factor_bits", "quantized_svd", "rank_for_budget"]


def _matrix_bits(n: int, k: int, fmt: str | None, group_size: int | None,
                 symmetric: bool) -> int:
    if fmt is None:
        return 16 * n * k
    f = QF.get(fmt)
    g = f.block_size if f.block_size is not None else group_size
    if g is None or k % g:
        g = k
    return n * k * f.bits + n * (k // g) * (16 + (0 if symmetric else f.bits))


def factor_bits(out_features: int, in_features: int, rank: int, fmt: str | None = "int4",
                group_size: int | None = 32, symmetric: bool = True) -> int:
    """Bits of a rank-``rank`` :class:`LowRankLinear` (out, in) built by
    :func:`quantized_svd` (module docstring).

    >>> factor_bits(64, 64, 4, "int4", 32)  # R: 4x64 codes, 8 scales; L: 64x4, 64 scales
    3200
    """
    return (_matrix_bits(rank, in_features, fmt, group_size, symmetric)
            + _matrix_bits(out_features, rank, fmt, group_size, symmetric))


def rank_for_budget(out_features: int, in_features: int, budget_bits: float,
                    fmt: str | None = "int4", group_size: int | None = 32,
                    symmetric: bool = True) -> int:
    """The largest rank whose :func:`factor_bits` is at most ``budget_bits`` bits per weight
    of the (out, in) matrix (ValueError when even rank 1 does not fit)."""
    if not isinstance(budget_bits, (int, float)) or isinstance(budget_bits, bool) or \
            not budget_bits > 0:
        raise ValueError(f"budget_bits must be a positive number of bits per weight, got "
                         f"{budget_bits!r}")
    total = budget_bits * out_features * in_features
    best = 0
    for r in range(1, min(out_features, in_features) + 1):
        if factor_bits(out_features, in_features, r, fmt, group_size, symmetric) > total:
            break
        best = r
    if best == 0:
        need = factor_bits(out_features, in_features, 1, fmt, group_size, symmetric)
        raise ValueError(f"budget_bits={budget_bits} per weight is below rank 1's "
                         f"{need / (out_features * in_features):.4g} for a "
                         f"({out_features}, {in_features}) matrix")
    return best


def quantized_svd(weight: torch.Tensor, rank: int | None = None,
                  budget_bits: float | None = None, fmt: str | None = "int4",
                  group_size: int | None = 32, symmetric: bool = True,
                  bias: torch.Tensor | None = None) -> LowRankLinear:
    """A :class:`LowRankLinear` approximating ``weight`` (out, in): the truncated SVD at
    ``rank``, or at the largest rank fitting ``budget_bits`` bits per weight (exactly one of
    the two), factors in ``fmt`` (None: float).

    >>> import torch
    >>> from qkern.decompose import quantized_svd
    >>> w = torch.randn(64, 8) @ torch.randn(8, 128)          # rank 8
    >>> m = quantized_svd(w, budget_bits=1.7, fmt="int8", group_size=None)
    >>> m.rank
    8
    >>> err = torch.linalg.norm(m.dequantize_weight() - w) / torch.linalg.norm(w)
    >>> bool(err < 0.01)
    True
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or \
            not weight.is_floating_point():
        raise ValueError("quantized_svd: weight must be a 2-D float (out, in) tensor")
    if (rank is None) == (budget_bits is None):
        raise ValueError("quantized_svd: give exactly one of rank and budget_bits")
    n, k = weight.shape
    if rank is None:
        rank = rank_for_budget(n, k, budget_bits, fmt, group_size, symmetric)
    check_int("quantized_svd", "rank", rank, 1)
    left, right = svd_factors(weight, rank)
    return LowRankLinear.from_factors(left, right, bias=bias, fmt=fmt, group_size=group_size,
                                      symmetric=symmetric)


def decompose_model(model: nn.Module, rank: int | None = None,
                    budget_bits: float | None = None, fmt: str | None = "int4",
                    group_size: int | None = 32, symmetric: bool = True,
                    include: list[str] | None = None, exclude: list[str] = (),
                    inplace: bool = False) -> nn.Module:
    """Every ``nn.Linear`` of ``model`` (``include`` / ``exclude``: name patterns or layer
    type names, as in the configs) replaced by :func:`quantized_svd` of it (``rank`` capped
    at the layer's smaller dim). A copy unless ``inplace``.

    >>> import torch
    >>> from qkern.decompose import decompose_model
    >>> m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    >>> q = decompose_model(m, rank=8, fmt="int8", group_size=None, exclude=["2"])
    >>> type(q[0]).__name__, type(q[2]).__name__
    ('LowRankLinear', 'Linear')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    BaseConfig(include=include, exclude=list(exclude))  # validates the patterns
    target = model if inplace else copy.deepcopy(model)
    todo = [(n, m) for n, m in target.named_modules() if type(m) is nn.Linear
            and (include is None or matches(n, m, include)) and not matches(n, m, exclude)]
    for name, lin in todo:
        r = None if rank is None else min(rank, *lin.weight.shape)
        new = quantized_svd(lin.weight.detach(), r, budget_bits, fmt, group_size, symmetric,
                            lin.bias)
        parent, _, child = name.rpartition(".")
        setattr(target.get_submodule(parent) if parent else target, child, new)
    return target
