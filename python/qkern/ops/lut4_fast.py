"""qkern::gemm_lut4_fast: the fast mode of the 4-bit codebook matmul (nf4, fp4_e2m1, fp4_bnb or
any 16-entry table), on gemm_w4's fast kernels (docs/numerics.md, "4-bit codebook fast mode").

The table is rounded to int8 once, ``t8[i] = round(table[i] / tmax * 127)`` (``tmax =
max |table|``, round half to even, in float64), and each group's float32 scale is multiplied by
``c = float32(tmax / 127)`` at pack time (``s' = float32(s * c)``). The op then computes
``y = x @ W^T (+ bias)`` with ``W[n, k] = t8[codes[n, k]] * s'[n, k // G]``, exactly as
gemm_w4's fast mode (activations quantized per block of 32 to int8, exact integer dot products,
float32 accumulation per block and group) with the code ``u = t8 + 128`` and the offset 128.
Identical bits on the scalar, AVX2 and AVX-512 paths and on any thread count.

Layout (``pack_weight``): gemm_w4's tiles, the nibble of element (n, k) being its table index;
``scales`` ``(N_pad // 8, K // G, 8)`` float32 (already times ``c``); ``table8`` uint8 (16,)
holding ``t8 + 128`` (in [1, 255]).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _C
from . import checks
from .cpu import NonFiniteError
from .raw import contig, ptr
from .schemas import LIB
from .tiles import check_int_codes
from .w4 import pack_weight as pack_w4
from .w4 import unpack_weight as unpack_w4

__all__ = ["check_args", "gemm_lut4_fast", "pack_weight", "run_gemm_lut4_fast", "table8",
           "unpack_weight"]


def table8(table: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(t8 + 128 as uint8 (16,), c = float32(tmax / 127))`` of a 16-entry float table."""
    t = torch.as_tensor(table).detach().cpu().reshape(-1)
    if t.numel() < 16 or not t.is_floating_point():
        raise ValueError(f"table must hold 16 floating-point values, got {t.dtype} with "
                         f"{t.numel()}")
    v = t[:16].double().numpy()
    if not np.isfinite(v).all():
        raise ValueError("table must be finite; it contains NaN or Inf")
    tmax = float(np.abs(v).max())
    if tmax == 0.0:
        raise ValueError("table is all zeros: no int8 table represents it")
    t8 = np.rint(v / tmax * 127.0).astype(np.int16) + 128
    return torch.from_numpy(t8.astype(np.uint8)), float(np.float32(tmax / 127.0))


def pack_weight(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor,
                group_size: int) -> dict:
    """Packs table indices ``codes`` (N, K) in 0..15, float scales (N, K // G) and the 16-entry
    float ``table`` for ``gemm_lut4_fast``: returns ``{"packed": uint8 (N_pad // 8, K // 32,
    128), "scales": float32 (N_pad // 8, K // G, 8) (times tmax / 127), "table8": uint8 (16,),
    "N", "K", "group_size"}``."""
    n, k = check_int_codes(codes, group_size)
    c = codes.detach().cpu()
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError("codes must be in 0..15")
    t8, factor = table8(table)
    s = scales.detach().cpu().float().reshape(n, k // group_size) * factor  # one float32 product
    w = pack_w4((c.to(torch.int16) - 8).to(torch.int8), s, None, group_size)  # nibble = code
    return {"packed": w["packed"], "scales": w["scales"], "table8": t8, "N": n, "K": k,
            "group_size": group_size}


def unpack_weight(w: dict, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pack_weight``'s codes (uint8 (N, K), 0..15) and scales (N, K // G) divided back by
    ``tmax / 127`` (``table`` the float table it was packed with; within a float32 rounding of
    the originals)."""
    codes, s, _ = unpack_w4({"packed": w["packed"], "N": w["N"], "K": w["K"],
                             "scales": w["scales"], "zeros": None})
    factor = table8(table)[1]
    return (codes.to(torch.int16) + 8).to(torch.uint8), s / factor


def check_args(x, packed, scales, table8, bias, N: int, K: int, group_size: int) -> None:
    """gemm_w4's fast-mode checks plus the int8 table: uint8 t8 + 128, 16 values in [1, 255]."""
    op = "gemm_lut4_fast"
    checks.gemm_w4(x, packed, scales, None, bias, N, K, group_size, 1, op=op)
    if table8.dtype != torch.uint8 or table8.numel() != 16:
        raise ValueError(f"{op}: table8 must be uint8 with 16 values (pack_weight's), got "
                         f"{table8.dtype} with {table8.numel()}")
    if table8.device.type == "cpu" and int(table8.min()) < 1:
        raise ValueError(f"{op}: table8 values must be in [1, 255] (t8 + 128, |t8| <= 127)")


def _gemm_lut4_fast_cpu(x, packed, scales, table8, bias, N, K, group_size):
    check_args(x, packed, scales, table8, bias, N, K, group_size)
    x, packed, scales = contig(x, torch.float32), packed.contiguous(), contig(scales, torch.float32)
    table8, bias = table8.contiguous(), contig(bias, torch.float32)
    return run_gemm_lut4_fast(x, packed, scales, table8, bias, N, K, group_size)


def run_gemm_lut4_fast(x, packed, scales, table8, bias, N, K, group_size):
    """The CPU body of ``gemm_lut4_fast`` on checked, contiguous arguments (x float32 (..., K);
    the weight operands as tensors or as their ``ptr`` addresses)."""
    checks.int8_act_bound_x("gemm_lut4_fast", x, group_size, "group_size")
    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32)
    bad = _C.gemm_w4_raw(ptr(x), x.numel() // K, ptr(packed), ptr(scales), 0, ptr(bias), N, K,
                         group_size, 1, ptr(y), 0, ptr(table8))
    if bad:
        raise NonFiniteError("gemm_lut4_fast: x contains NaN or Inf (the fast mode quantizes x "
                             "to int8; use the exact gemm_lut4 to propagate them)")
    return y


LIB.impl("gemm_lut4_fast", _gemm_lut4_fast_cpu, "CPU")


def gemm_lut4_fast(x: torch.Tensor, w: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., K) @ W^T (+ bias)`` -> float32 (..., N) for ``w = pack_weight(...)``; x may be
    float32, bfloat16 or float16.

    >>> import torch, qkern
    >>> from qkern.ops import lut4_fast
    >>> q = qkern.quantize(torch.randn(16, 64), "nf4", group_size=32)
    >>> w = lut4_fast.pack_weight(q.codes, q.scale, torch.from_numpy(q.format.lut), 32)
    >>> lut4_fast.gemm_lut4_fast(torch.randn(2, 64), w).shape
    torch.Size([2, 16])
    """
    return torch.ops.qkern.gemm_lut4_fast(x, w["packed"], w["scales"], w["table8"], bias,
                                          w["N"], w["K"], w["group_size"])

