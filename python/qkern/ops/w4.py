"""qkern::gemm_w4: matmul with int4 group-wise weights (docs/numerics.md, "int4 group-wise
matmul").

``y = x @ W^T (+ bias)`` with ``W[n, k] = (q[n, k] - z[n, g]) * s[n, g]``, ``g = k // G``,
codes ``q`` and zero points ``z`` in [-8, 7] (``z = 0``: symmetric), float32 scales ``s``.
Float32 ``zeros`` are instead float zero points of the stored nibble ``u = q + 8`` (HQQ's
``uint4`` codes): ``W[n, k] = (float(u) - z) * s``, each operation rounded to float32.

- ``mode=0`` ("exact"): weights dequantized to float32 exactly as ``qkern.dequantize`` and
  accumulated by float32 FMA in a fixed order;
- ``mode=1`` ("fast"): activations quantized on the fly per block of 32 along K to int8
  (``scale = amax / 127``, round-nearest-even), integer dot products, float32 accumulation
  per block and group.

Both modes give identical bits on the scalar and AVX2 paths and on any thread count.

Layout (``pack_weight``): rows in tiles of 8 (N padded with zero codes), K in blocks of 32;
tile ``t``, block ``b`` is 128 bytes, four 32-byte vectors ``i = 0..3``, vector ``i`` holding
codes ``8i .. 8i+7`` of the block for the 8 rows of the tile, one 32-bit word per row (row
``r`` at bytes ``4r .. 4r+3``); in a word the codes are nibbles ``u = q + 8``, byte
``j = u[8i + j] | u[8i + 4 + j] << 4``. One AVX2 lane then accumulates one output row (no
horizontal sums). Scales and zero points are stored per tile and group as 8 consecutive
values: ``(N_pad // 8, K // G, 8)``. csrc/cpu/gemm/w4/api.h is the reference for this layout.
"""

from __future__ import annotations

import torch

from .. import _C
from . import checks
from .cpu import NonFiniteError
from .raw import contig, ptr
from .schemas import LIB
from .tiles import (
    check_int_codes,
    check_scales_zeros,
    from_tiles,
    padded,
    parse_mode,
    split_zeros,
    to_tiles,
    zeros_dtype,
)

__all__ = ["gemm_w4", "pack_weight", "run_gemm_w4", "unpack_weight"]

def _gemm_w4_cpu(x, packed, scales, zeros, bias, N, K, group_size, mode):
    checks.gemm_w4(x, packed, scales, zeros, bias, N, K, group_size, mode)
    x, packed, scales = contig(x, torch.float32), packed.contiguous(), contig(scales, torch.float32)
    (zeros, zeros_f), bias = split_zeros(zeros), contig(bias, torch.float32)
    return run_gemm_w4(x, packed, scales, zeros, zeros_f, bias, N, K, group_size, mode)


def run_gemm_w4(x, packed, scales, zeros, zeros_f, bias, N, K, group_size, mode):
    """The CPU body of ``gemm_w4`` on checked, contiguous arguments of the kernel's dtypes
    (x float32 (..., K); int32 ``zeros`` or float32 ``zeros_f``, or neither; the weight
    operands as tensors or as their ``ptr`` addresses): the op after its checks, and
    QuantLinear's per-call fast path (qkern.kernels.base.Kernel.plan)."""
    if mode == 1:
        checks.int8_act_bound_x("gemm_w4", x, group_size, "group_size")
    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32)
    bad = _C.gemm_w4_raw(ptr(x), x.numel() // K, ptr(packed), ptr(scales), ptr(zeros),
                         ptr(bias), N, K, group_size, mode, ptr(y), ptr(zeros_f))
    if bad:
        raise NonFiniteError("gemm_w4: x contains NaN or Inf (the fast mode quantizes x to "
                             "int8; use mode=0 (exact) to propagate them)")
    return y


LIB.impl("gemm_w4", _gemm_w4_cpu, "CPU")


def pack_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                group_size: int = 128) -> dict:
    """Packs int4 codes (N, K) in [-8, 7], float scales (N, K // G) and optional int zero points
    (N, K // G) in [-8, 7] (or float32 zero points of ``u = q + 8``) for ``gemm_w4``. Returns
    ``{"packed": uint8 (N_pad // 8, K // 32, 128), "scales": float32 (N_pad // 8, K // G, 8),
    "zeros": int32 (float32) like scales or None, "N", "K", "group_size"}``."""
    n, k = check_int_codes(codes, group_size)
    c = codes.detach().cpu()
    if c.numel() and (int(c.min()) < -8 or int(c.max()) > 7):
        raise ValueError("codes must be in [-8, 7]")
    check_scales_zeros(scales, zeros, n, k // group_size, -8, 7, "zero points")
    packed = torch.from_numpy(_C.pack_w4(c.to(torch.int8).contiguous().numpy(), group_size))
    return {
        "packed": packed.view(padded(n) // 8, k // 32, 128),
        "scales": to_tiles(scales.detach().cpu().to(torch.float32), n),
        "zeros": None if zeros is None else to_tiles(zeros_dtype(zeros.detach().cpu()), n),
        "N": n,
        "K": k,
        "group_size": group_size,
    }


def unpack_weight(w: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of ``pack_weight``: (codes int8 (N, K), scales (N, K // G), zeros or None)."""
    n, k = w["N"], w["K"]
    codes = torch.from_numpy(_C.unpack_w4(w["packed"].contiguous().numpy(), n, k))
    zeros = None if w["zeros"] is None else from_tiles(w["zeros"], n)
    return codes, from_tiles(w["scales"], n), zeros


def gemm_w4(x: torch.Tensor, w: dict, bias: torch.Tensor | None = None,
            mode: str | int = "exact") -> torch.Tensor:
    """``x (..., K) @ W^T (+ bias)`` -> float32 (..., N) for ``w = pack_weight(...)``;
    ``mode``: "exact" (0) or "fast" (1). x may be float32, bfloat16 or float16."""
    return torch.ops.qkern.gemm_w4(x, w["packed"], w["scales"], w["zeros"], bias, w["N"],
                                   w["K"], w["group_size"], parse_mode(mode))
