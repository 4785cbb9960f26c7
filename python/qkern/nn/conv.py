"""QuantConv1d / QuantConv2d: convolutions as im2col (``F.unfold``) onto a QuantLinear, so a
quantized conv runs on the same fused matmul kernels as a Linear layer.

The weight (out, in, *kernel) is quantized as the (out, in * prod(kernel)) matrix the GEMM
sees (per output channel, or in groups along in * prod(kernel)). groups > 1 and padding
modes other than "zeros" are not supported (``from_float`` raises; the workflow leaves such
layers in float with a warning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import QuantLinear


class _QuantConvNd(nn.Module):
    ndim = 2

    def __init__(self, qlinear: QuantLinear, in_channels: int, kernel_size, stride, padding,
                 dilation):
        super().__init__()
        self.qlinear = qlinear
        self.in_channels, self.out_channels = in_channels, qlinear.out_features
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)

    @classmethod
    def from_float(cls, conv: nn.Module, fmt: str = "int8", *, group_size: int | None = None,
                   **kw) -> _QuantConvNd:
        cls._check(conv)
        w = conv.weight.detach()
        lin = nn.Linear(w[0].numel(), w.shape[0], bias=conv.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(w.reshape(w.shape[0], -1))
            if conv.bias is not None:
                lin.bias.copy_(conv.bias.detach())
        ql = QuantLinear.from_float(lin, fmt, group_size=group_size, **kw)
        return cls.from_quant_linear(conv, ql)

    @classmethod
    def from_quant_linear(cls, conv: nn.Module, qlinear: QuantLinear) -> _QuantConvNd:
        """The quantized conv of ``conv``'s geometry (``conv`` may be on the meta device)
        computing with ``qlinear`` (out, in * prod(kernel))."""
        cls._check(conv)
        return cls(qlinear, conv.in_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation)

    @classmethod
    def _check(cls, conv: nn.Module) -> None:
        want = nn.Conv1d if cls.ndim == 1 else nn.Conv2d
        if not isinstance(conv, want):
            raise TypeError(f"from_float expects an nn.{want.__name__}, got "
                            f"{type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"grouped convolutions (groups={conv.groups}) are not supported")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported")
        if isinstance(conv.padding, str):
            raise ValueError(f"padding={conv.padding!r} is not supported; give sizes")

    def _as2d(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-2) if self.ndim == 1 else x

    def _pair(self, t: tuple) -> tuple:
        return (1, *t) if self.ndim == 1 else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (batch, {self.in_channels}, "
                             f"{'L' if self.ndim == 1 else 'H, W'}), got {tuple(x.shape)}")
        x2 = self._as2d(x)
        ks, st = self._pair(self.kernel_size), self._pair(self.stride)
        pd = (0, *self.padding) if self.ndim == 1 else self.padding
        dl = self._pair(self.dilation)
        cols = F.unfold(x2, ks, dilation=dl, padding=pd, stride=st)  # (B, C*k, L)
        out_hw = [(x2.shape[2 + i] + 2 * pd[i] - dl[i] * (ks[i] - 1) - 1) // st[i] + 1
                  for i in range(2)]
        y = self.qlinear(cols.transpose(1, 2))  # (B, L, out)
        y = y.transpose(1, 2).reshape(x.shape[0], self.out_channels, *out_hw)
        return y.squeeze(-2) if self.ndim == 1 else y

    def dequantize_weight(self) -> torch.Tensor:
        w = self.qlinear.dequantize_weight()
        return w.view(self.out_channels, self.in_channels, *self.kernel_size)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}")


class QuantConv1d(_QuantConvNd):
    ndim = 1


class QuantConv2d(_QuantConvNd):
    ndim = 2


__all__ = ["QuantConv1d", "QuantConv2d"]
