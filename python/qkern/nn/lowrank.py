"""Low-rank layers: a weight held as a product of two factors, and a quantized layer with a
low-rank correction beside it.

- :class:`LowRankLinear`: ``y = up(down(x)) + b``, the weight ``W ~ L R`` with ``L`` (out, r)
  the ``up`` layer's weight and ``R`` (r, in) the ``down`` layer's; each factor a float
  ``nn.Linear`` or a :class:`~qkern.nn.QuantLinear` (:meth:`LowRankLinear.from_factors`);
- :class:`CompensatedLinear`: ``y = base(x) + side(x)``, a quantized layer plus a low-rank
  side path fitting its quantization error (LoRC, LQ-LoRA);
- :func:`weight_bits`: the storage of a layer's weights in bits, counted as the LLM reports
  count them (codes at the format's width, a float16 scale per group, a zero point of the
  code width per group when asymmetric; float weights at ``float_bits``, 16 by default).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import formats as QF
from .conv import QuantConv1d, QuantConv2d
from .linear import QuantLinear

__all__ = ["CompensatedLinear", "LowRankLinear", "factor_layer", "weight_bits"]


def _check_matrix(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}")
    if t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"{name} must be a 2-D float matrix, got {t.dim()}-D {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t.detach().float()


def factor_layer(weight: torch.Tensor, fmt: str | None = None, group_size: int | None = None,
                 symmetric: bool = True) -> nn.Module:
    """A bias-free layer computing ``x @ weight.T``: a float ``nn.Linear`` when ``fmt`` is
    None, else a :class:`QuantLinear` in ``fmt`` with groups of ``group_size`` along the
    input dim (per output channel when None or when it does not divide the input size)."""
    w = _check_matrix("weight", weight)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    if fmt is None:
        return lin
    f = QF.get(fmt)
    g = group_size
    if g is not None and w.shape[1] % g:
        g = None
    if f.block_size is not None:
        if w.shape[1] % f.block_size:
            raise ValueError(f"block format {fmt} needs the factor's input size "
                             f"({w.shape[1]}) to be a multiple of {f.block_size}")
        g = None
    return QuantLinear.from_float(lin, fmt, group_size=g, symmetric=symmetric)


def _dense(m: nn.Module) -> torch.Tensor:
    if isinstance(m, nn.Linear):
        return m.weight.detach().float()
    return m.dequantize_weight()


class LowRankLinear(nn.Module):
    """``y = up(down(x)) + bias``: a rank-``r`` weight ``L R`` (``L`` (out, r) in ``up``,
    ``R`` (r, in) in ``down``), each factor float or quantized.

    >>> import torch
    >>> from qkern.nn import LowRankLinear
    >>> L, R = torch.randn(32, 4), torch.randn(4, 64)
    >>> m = LowRankLinear.from_factors(L, R)
    >>> x = torch.randn(3, 64)
    >>> bool(torch.allclose(m(x), x @ (L @ R).T, atol=1e-4))
    True
    >>> q = LowRankLinear.from_factors(L, R, fmt="int8")
    >>> q.rank, q.in_features, q.out_features
    (4, 64, 32)
    """

    def __init__(self, down: nn.Module, up: nn.Module, bias: torch.Tensor | None = None):
        super().__init__()
        for name, m in (("down", down), ("up", up)):
            if not isinstance(m, (nn.Linear, QuantLinear)):
                raise TypeError(f"{name} must be an nn.Linear or a QuantLinear, got "
                                f"{type(m).__name__}")
            if getattr(m, "bias", None) is not None:
                raise ValueError(f"{name} must have no bias (the bias goes to LowRankLinear)")
        if up.in_features != down.out_features:
            raise ValueError(f"up takes {up.in_features} inputs but down gives "
                             f"{down.out_features}")
        self.down, self.up = down, up
        self.in_features, self.out_features = down.in_features, up.out_features
        self.rank = down.out_features
        self.bias = None if bias is None else nn.Parameter(
            bias.detach().float().clone().reshape(self.out_features), requires_grad=False)

    @classmethod
    def from_factors(cls, left: torch.Tensor, right: torch.Tensor,
                     bias: torch.Tensor | None = None, fmt: str | None = None,
                     group_size: int | None = None, symmetric: bool = True) -> LowRankLinear:
        """``left`` (out, r) and ``right`` (r, in), float or quantized in ``fmt`` (each
        factor grouped along its own input dim: ``group_size`` where it divides, else per
        output channel)."""
        left, right = _check_matrix("left", left), _check_matrix("right", right)
        if left.shape[1] != right.shape[0]:
            raise ValueError(f"left is {tuple(left.shape)} and right {tuple(right.shape)}: "
                             "their inner (rank) dims differ")
        if left.shape[1] < 1:
            raise ValueError("the rank must be at least 1")
        return cls(factor_layer(right, fmt, group_size, symmetric),
                   factor_layer(left, fmt, group_size, symmetric), bias)

    def dequantize_weight(self) -> torch.Tensor:
        """The float32 (out, in) weight ``L R`` the layer computes with."""
        return _dense(self.up) @ _dense(self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.down(x))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"rank={self.rank}"


class CompensatedLinear(nn.Module):
    """``y = base(x) + side(x)``: a quantized layer ``base`` (its weight ``Q``) and a
    low-rank ``side`` path (a :class:`LowRankLinear` without bias) so that the layer computes
    with ``Q + L R``.

    >>> import torch
    >>> from qkern.nn import CompensatedLinear, LowRankLinear, QuantLinear
    >>> lin = torch.nn.Linear(64, 32)
    >>> q = QuantLinear.from_float(lin, "int4", group_size=32)
    >>> e = lin.weight.detach() - q.dequantize_weight()
    >>> u, s, vh = torch.linalg.svd(e)
    >>> m = CompensatedLinear(q, LowRankLinear.from_factors(u[:, :32] * s[:32], vh[:32]))
    >>> bool(torch.allclose(m.dequantize_weight(), lin.weight, atol=1e-4))
    True
    """

    def __init__(self, base: nn.Module, side: LowRankLinear):
        super().__init__()
        if not isinstance(side, LowRankLinear):
            raise TypeError(f"side must be a LowRankLinear, got {type(side).__name__}")
        if side.bias is not None:
            raise ValueError("side must have no bias (the base layer keeps it)")
        shape = (getattr(base, "out_features", None), getattr(base, "in_features", None))
        if shape != (side.out_features, side.in_features):
            raise ValueError(f"base is {shape} (out, in) but side is "
                             f"{(side.out_features, side.in_features)}")
        self.base, self.side = base, side
        self.out_features, self.in_features = shape

    def dequantize_weight(self) -> torch.Tensor:
        """The float32 (out, in) weight ``Q + L R``."""
        return _dense(self.base) + self.side.dequantize_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.side(x)


def weight_bits(m: nn.Module, float_bits: int = 16) -> int:
    """Bits to store the weights of ``m`` (biases not counted): a QuantLinear's codes at the
    format's width plus, per scale, 16 bits and (with zero points) the code width; a float
    ``nn.Linear`` / ``nn.Conv*`` at ``float_bits`` per weight; a LowRankLinear /
    CompensatedLinear the sum of its parts; other modules the sum over their children."""
    if isinstance(m, QuantLinear):
        q = m.weight_q
        bits = q.format.bits
        n_scales = q.scale.numel()
        return q.layout.numel * bits + n_scales * (16 + (bits if q.zero_point is not None
                                                         else 0))
    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return m.weight.numel() * float_bits
    if isinstance(m, (QuantConv1d, QuantConv2d)):
        return weight_bits(m.qlinear, float_bits)
    return sum(weight_bits(c, float_bits) for c in m.children())
