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
from .decoded import chunked_matmul
from .raw import contig, ptr
from .schemas import LIB

__all__ = ["DECODED_MIN_ROWS", "FORMATS", "GROUP_SIZES", "decoded_min_rows", "gemm_fp8",
           "group_error", "pack_weight", "run_decoded", "run_gemm_fp8", "use_decoded"]

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

#: the fewest rows of x for which the CPU op decodes the weight by chunks for ``torch.mm``
#: (:func:`run_decoded`) instead of running its kernel, by ISA (None: never). AVX2: never (its
#: tiled kernel is as fast as torch's fp32 GEMM or faster: an AVX2-only EPYC, 2 threads,
#: 4096 x 4096, M = 64 / 256 / 512: tiled 15.6 / 59.6 / 101.0 ms, decoded 28.0 / 76.0 / 105.7,
#: fp32 22.0 / 70.1 / 108.6); AVX-512 runs that AVX2 kernel from 5 rows while torch's GEMM
#: doubles its speed (0.54x fp32 at M = 512, docs/speed.md eleventh pass): decoded from 128
#: rows; the amx level with AMX-BF16 keeps its bf16x3 tiles (1.4-1.8x fp32)
DECODED_MIN_ROWS = {"scalar": 32, "avx2": None, "avx512": 128, "amx": 128}


def decoded_min_rows() -> int | None:
    """:data:`DECODED_MIN_ROWS` of the active ISA; None where the amx level has its bf16x3
    kernel (the CPU has AMX-BF16)."""
    isa = _C.get_isa()
    if isa == "amx" and _C.cpu_has_amx_bf16():
        return None
    return DECODED_MIN_ROWS.get(isa, 128)


def run_decoded(x, w, scales, bias, N, K, group_size, fmt):
    """``x @ W^T (+ bias)`` on checked, contiguous CPU tensors (x float32 (M, K)), ``W``
    decoded as the definition has it (``fp8_value(code) * s``) a chunk of rows at a time into
    a reused buffer and multiplied by ``torch.mm`` (:mod:`qkern.ops.decoded`)."""
    pw, ps = ptr(w), ptr(scales)

    def decode(n0: int, n1: int, out: int) -> None:
        _C.fp8_decode_raw(pw, ps, N, n0, n1, K, group_size, fmt, out)

    return chunked_matmul(x, decode, N, K, bias)


def use_decoded(m: int) -> bool:
    """Whether ``m`` rows of x take :func:`run_decoded` on the active ISA."""
    if m < 32:  # decode steps: no ISA query
        return False
    low = decoded_min_rows()
    return low is not None and m >= low


def _gemm_fp8_cpu(x, w, scales, bias, N, K, group_size, fmt):
    checks.gemm_fp8(x, w, scales, bias, N, K, group_size, fmt)
    x, w, scales = contig(x, torch.float32), w.contiguous(), contig(scales, torch.float32)
    bias = contig(bias, torch.float32)
    if use_decoded(x.shape[0]):
        return run_decoded(x, w, scales, bias, N, K, group_size, fmt)
    return run_gemm_fp8(x, w, scales, bias, N, K, group_size, fmt)


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
