"""qkern::gemm_lut4: fused matmul with 4-bit codebook weights (nf4, fp4_e2m1, fp4_bnb or any
16-entry table).

``y = x @ W^T (+ bias)`` with ``W[n, k] = table[codes[n, k]] * scales[n, k // group_size]``,
each weight decoded exactly as ``dequantize_lut`` (one float32 product) and accumulated in
float32 (FMA and partial sums on AVX2, so paths agree to float32 rounding, not bit for bit).

Layout (``pack_weight``): each row of codes is an LSB-first nibble stream, ``packed[n, k // 2]``
holding element ``k`` in its low nibble (even ``k``) or high nibble (odd ``k``); scales are
float32 ``(N, K // group_size)``.
"""

from __future__ import annotations

import torch

from .. import _C
from .schemas import LIB

__all__ = ["GROUP_SIZES", "gemm_lut4", "pack_weight"]

GROUP_SIZES = (32, 64, 128)

LIB.define(
    "gemm_lut4(Tensor x, Tensor packed, Tensor scales, Tensor table, Tensor? bias, int N, "
    "int K, int group_size) -> Tensor"
)


@torch.library.register_fake("qkern::gemm_lut4")
def _(x, packed, scales, table, bias, N, K, group_size):
    torch._check(x.dim() == 2 and x.shape[1] == K, lambda: "gemm_lut4: x must be (M, K)")
    return x.new_empty((x.shape[0], N), dtype=torch.float32)


def _np(t: torch.Tensor | None):
    return None if t is None else t.detach().contiguous().numpy()


def _gemm_lut4_cpu(x, packed, scales, table, bias, N, K, group_size):
    y = _C.gemm_lut4(_np(x.float()), _np(packed), _np(scales.float()), _np(table.float()),
                     _np(None if bias is None else bias.float()), N, K, group_size)
    return torch.from_numpy(y)


LIB.impl("gemm_lut4", _gemm_lut4_cpu, "CPU")


def gemm_lut4(x: torch.Tensor, packed: dict[str, torch.Tensor] | torch.Tensor,
              scales: torch.Tensor | None = None, table: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, *, N: int | None = None, K: int | None = None,
              group_size: int | None = None) -> torch.Tensor:
    """Convenience wrapper: ``gemm_lut4(x, pack_weight(...), table=...)`` for x of any leading
    shape (..., K)."""
    if isinstance(packed, dict):
        scales = packed["scales"] if scales is None else scales
        N, K, group_size = packed["N"], packed["K"], packed["group_size"]
        packed = packed["packed"]
    if table is None or scales is None or None in (N, K, group_size):
        raise ValueError("gemm_lut4 needs packed, scales, table, N, K and group_size")
    lead = x.shape[:-1]
    y = torch.ops.qkern.gemm_lut4(x.reshape(-1, K).float().contiguous(), packed, scales,
                                  table[:16].float().contiguous(), bias, N, K, group_size)
    return y.reshape(*lead, N)


def pack_weight(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> dict:
    """Packs 4-bit codes (N, K) (uint8, values 0..15) and their float32 scales (N, K/G) for
    ``gemm_lut4``: returns ``{"packed": uint8 (N, K // 2), "scales": float32 (N, K // G),
    "N": N, "K": K, "group_size": G}``."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide K = {k}")
    c = codes.to(torch.uint8) if codes.dtype != torch.uint8 else codes
    if c.numel() and int(c.max()) > 15:
        raise ValueError("codes must be in 0..15")
    s = scales.detach().float().reshape(n, k // group_size).contiguous()
    packed = (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()
    return {"packed": packed, "scales": s, "N": n, "K": k, "group_size": group_size}
