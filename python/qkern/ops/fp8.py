"""qkern::gemm_fp8: matmul with FP8 weights (OCP E4M3 "fn" or E5M2), one byte per weight.

``y = x @ W^T (+ bias)`` with ``W[n, k] = value(codes[n, k]) * scales[n, k // G]`` (or one
scale per row: ``group_size=0``), each weight decoded exactly as qkern's ``dequantize`` (the
FP8 value times the scale, one float32 product), accumulated in float32 (docs/numerics.md
"FP8 matmul" gives the orders and bounds per path).

Layout: the codes as ``qkern.quantize(w, "fp8_e4m3")`` gives them, uint8 bit patterns, plain
row-major ``(N, K)``; scales float32 ``(N,)`` or ``(N, K // G)``. ``fmt``: 0 = fp8_e4m3,
1 = fp8_e5m2. NaN / Inf codes never come out of qkern's quantizer; ``pack_weight`` rejects
them (the kernel reads them as their bit pattern: E5M2 Inf/NaN, E4M3 0x7f as 480).
"""

from __future__ import annotations

import torch

from .. import _C
from . import checks
from .raw import contig, ptr
from .schemas import LIB

__all__ = ["FORMATS", "GROUP_SIZES", "gemm_fp8", "group_error", "pack_weight",
           "run_gemm_fp8"]

FORMATS = {"fp8_e4m3": 0, "fp8_e5m2": 1}
GROUP_SIZES = (32, 64, 128)


def group_error(k: int, group_size: int | None) -> str | None:
    """Why ``pack_weight`` cannot take ``group_size`` with K = ``k`` (None when it can): None
    (per channel) or one of ``GROUP_SIZES`` dividing K."""
    if group_size is None:
        return None
    if group_size not in GROUP_SIZES:
        return f"group_size must be None (per channel) or one of {GROUP_SIZES}, got {group_size}"
    if k % group_size:
        return f"group_size {group_size} does not divide K = {k}"
    return None

def _gemm_fp8_cpu(x, w, scales, bias, N, K, group_size, fmt):
    checks.gemm_fp8(x, w, scales, bias, N, K, group_size, fmt)
    x, w, scales = contig(x, torch.float32), w.contiguous(), contig(scales, torch.float32)
    return run_gemm_fp8(x, w, scales, contig(bias, torch.float32), N, K, group_size, fmt)


def run_gemm_fp8(x, w, scales, bias, N, K, group_size, fmt):
    """The CPU body of ``gemm_fp8`` on checked, contiguous arguments (x float32 (M, K))."""
    y = torch.empty((x.shape[0], N), dtype=torch.float32)
    _C.gemm_fp8_raw(ptr(x), x.shape[0], ptr(w), ptr(scales), ptr(bias), N, K, group_size, fmt,
                    ptr(y))
    return y


LIB.impl("gemm_fp8", _gemm_fp8_cpu, "CPU")


def _fmt_id(fmt: str | int) -> int:
    if isinstance(fmt, int) and fmt in FORMATS.values():
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {tuple(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def _special_codes(codes: torch.Tensor, fmt: int) -> torch.Tensor:
    """Mask of NaN (and, for E5M2, Inf) codes."""
    if fmt == FORMATS["fp8_e4m3"]:
        return (codes & 0x7F) == 0x7F
    return (codes & 0x7C) == 0x7C


def pack_weight(codes: torch.Tensor, scales: torch.Tensor, group_size: int | None,
                fmt: str | int) -> dict:
    """FP8 codes (N, K) (uint8 bit patterns) and their float32 scales for ``gemm_fp8``:
    ``group_size=None`` for one scale per row (``scales`` with N values), else one of
    ``GROUP_SIZES`` (``scales`` (N, K // G)). Returns ``{"w": uint8 (N, K), "scales": float32,
    "N", "K", "group_size" (0 = per channel), "fmt" (0 = E4M3, 1 = E5M2)}``; large ``w`` sits
    in huge-page memory."""
    f = _fmt_id(fmt)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    if codes.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"codes must be uint8 FP8 bit patterns, got {codes.dtype}")
    c = codes.view(torch.uint8) if codes.dtype == torch.int8 else codes
    n, k = c.shape
    err = group_error(k, group_size)
    if err is not None:
        raise ValueError(err)
    ng, g = (1, 0) if group_size is None else (k // group_size, group_size)
    if scales.numel() != n * ng:
        raise ValueError(f"scales must have {n * ng} values (N={n} x {ng}), got {scales.numel()}")
    bad = _special_codes(c, f)
    if bool(bad.any()):
        idx = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(f"codes hold {int(bad.sum())} NaN/Inf codes (first at flat index {idx}, "
                         f"code 0x{int(c.reshape(-1)[idx]):02x}); qkern's quantizer never "
                         "produces them")
    s = scales.detach().float().reshape(n, ng).contiguous()
    if g == 0:
        s = s.reshape(n)
    w = torch.from_numpy(_C.pack_fp8(c.detach().contiguous().numpy()))
    return {"w": w, "scales": s, "N": n, "K": k, "group_size": g, "fmt": f}


def gemm_fp8(x: torch.Tensor, packed: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., K) @ W^T (+ bias)`` for ``packed = pack_weight(...)``; float32 result."""
    n, k = packed["N"], packed["K"]
    lead = x.shape[:-1]
    y = torch.ops.qkern.gemm_fp8(x.reshape(-1, k).float().contiguous(), packed["w"],
                                 packed["scales"], bias, n, k, packed["group_size"],
                                 packed["fmt"])
    return y.reshape(*lead, n)
