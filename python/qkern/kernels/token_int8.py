"""Per-token dynamic int8 activations in front of any weight (``act="int8_token"``): each row
of x is quantized to int8 (scale ``max_k |x[m, k]| / 127``, 0 -> 1; codes
``clamp(rne(x / s), -127, 127)``: the rule of gemm_w8a8, docs/numerics.md) and dequantized,
then the weight's own float-activation kernel (w4_exact, w23_exact, w8a16, or the "dequant"
fallback) runs on it. The product is ZeroQuant's token-wise int8 activations x group-wise
weights, computed in float32; straight-through gradient for x. The int8 per-channel weights
have the fused integer path instead (``act="int8_dynamic"``, gemm_w8a8)."""

from __future__ import annotations

import torch

from ..ops import NonFiniteError
from ..tensor import QTensor
from .base import Kernel, by_name, register, select

F32_TINY = float(torch.finfo(torch.float32).tiny)


def per_token_int8(x2: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) float32 quantized to int8 per row and dequantized; the gradient passes
    unchanged (straight-through)."""
    xd = x2.detach()
    if xd.numel() == 0:
        return x2
    amax = xd.abs().amax(1, keepdim=True)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(amax).all()):
        raise NonFiniteError("int8_token: x contains NaN or Inf")
    s = torch.where(amax > 0, (amax / 127.0).clamp_min(F32_TINY), torch.ones_like(amax))
    xq = torch.clamp(torch.round(xd * (1.0 / s)), -127.0, 127.0) * s
    if x2.requires_grad and torch.is_grad_enabled():
        return xq + (x2 - xd)
    return xq


@register
class Int8Token(Kernel):
    names = ("a8_token",)
    acts = ("int8_token",)
    order = 90
    needs = "any weight"

    def claims(self, q: QTensor) -> bool:
        return False  # never the kernel meant for a format: it wraps the one that is

    def reason(self, q: QTensor, act: str, mode: str) -> str | None:
        return None

    def inner(self, q: QTensor) -> str:
        """The float-activation kernel of the weight (what ``act="none"`` would run)."""
        return select(q, "none", "exact").name

    def unpack(self, name: str, q: QTensor, bufs: dict[str, torch.Tensor]) -> QTensor:
        inner = self.inner(q)
        return by_name(inner).unpack(inner, q, bufs)

    def pack(self, q: QTensor, act: str, mode: str) -> dict[str, torch.Tensor]:
        name = self.inner(q)
        return by_name(name).pack(q, "none", "exact")

    def forward(self, name, x, bufs, bias, n, k, q):
        inner = self.inner(q)
        xq = per_token_int8(x.reshape(-1, k).float().contiguous())
        y = by_name(inner).forward(inner, xq, bufs, bias, n, k, q)
        return y.reshape(*x.shape[:-1], n)

    def weight(self, name: str, q: QTensor, bufs: dict[str, torch.Tensor]) -> torch.Tensor:
        inner = self.inner(q)
        return by_name(inner).weight(inner, q, bufs)
