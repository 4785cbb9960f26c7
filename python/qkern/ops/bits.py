"""1-bit (binary) and 1.58-bit (ternary) weight matmuls, one scale per output channel.

``gemm_binary(x, wbits, alpha, bias, N, K, xnor)``: weights ``w = alpha[n] * b[n, k]`` with
``b`` in {+1, -1} (binary code 0 -> +1, 1 -> -1, as the ``binary`` format). With
``xnor=False`` the float32 activations are summed with signs (no multiplies per weight); with
``xnor=True`` they are binarized per row (bit = ``x < 0``, ``beta[m] = mean|x[m]|``) and
``y = alpha[n] * beta[m] * (K - 2 * popcount(xbits ^ wbits))`` (XNOR-Net), exact in integers.

``gemm_ternary(x, wpacked, alpha, bias, N, K)``: ``w = alpha[n] * t[n, k]``, ``t`` in {-1, 0, 1}.

``x`` is ``(..., K)``; the result is float32 ``(..., N)``. Pack the weights with
:func:`pack_binary` / :func:`pack_ternary`: rows in tiles of 8, one 32-bit word per row and 30
weights, so that the AVX2 kernels look groups of 3 weights up in per-call tables of activation
sums (layout in ``csrc/cpu/gemm/bits/api.h`` and docs/numerics.md).
"""

from __future__ import annotations

import torch

from .. import _C
from . import checks
from .checks import bits_blocks as blocks
from .checks import bits_packed_nbytes as packed_nbytes
from .raw import contig, ptr
from .schemas import LIB

__all__ = ["blocks", "pack_binary", "pack_ternary", "packed_nbytes", "run_gemm_bits"]


def _pack(name: str, codes: torch.Tensor, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    if codes.dim() != 2:
        raise ValueError(f"{name}: codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    c = codes.detach().cpu().to(torch.int32)
    if c.numel() and (c.min() < lo or c.max() > hi):
        raise ValueError(f"{name}: codes must be in [{lo}, {hi}]"
                         + (" (0 -> +1, 1 -> -1)" if lo == 0 else ""))
    n, k = codes.shape
    if k == 0:
        raise ValueError(f"{name}: codes must have K >= 1 columns")
    if n == 0:
        return torch.zeros((0, packed_nbytes(8, k, lo < 0)), dtype=torch.uint8)
    packed = getattr(_C, name)(c.to(dtype).contiguous().numpy())
    return torch.from_numpy(packed).view((n + 7) // 8, -1)


def pack_binary(codes: torch.Tensor) -> torch.Tensor:
    """Binary codes ``(N, K)`` (0 -> +1, 1 -> -1) -> ``wbits`` uint8 ``(ceil(N/8), 32 *
    ceil(K/30))``: tiles of 8 rows, one 32-bit word per row per 30 weights (bit = -1)."""
    return _pack("pack_binary", codes, 0, 1, torch.uint8)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes ``(N, K)`` in {-1, 0, 1} -> ``wpacked`` uint8 ``(ceil(N/8), 64 *
    ceil(K/30))``: as :func:`pack_binary`, with a +1 plane and a -1 plane per block."""
    return _pack("pack_ternary", codes, -1, 1, torch.int8)


def _out_shape(x: torch.Tensor, n: int) -> tuple[int, ...]:
    return (*x.shape[:-1], n)


def _run_cpu(op: str, ternary: bool, x, w, alpha, bias, n: int, k: int, xnor: bool):
    checks.gemm_bits(op, x, w, alpha, bias, n, k)
    x, w = contig(x, torch.float32), w.contiguous()
    alpha, bias = contig(alpha, torch.float32), contig(bias, torch.float32)
    return run_gemm_bits(ternary, x, w, alpha, bias, n, k, xnor)


def run_gemm_bits(ternary: bool, x, w, alpha, bias, n: int, k: int, xnor: bool):
    """The CPU body of ``gemm_binary`` / ``gemm_ternary`` on checked, contiguous arguments."""
    y = torch.empty(_out_shape(x, n), dtype=torch.float32)
    if y.numel() == 0:
        return y
    _C.gemm_bits_raw(ternary, ptr(x), x.numel() // k, ptr(w), ptr(alpha), ptr(bias), n, k, xnor,
                     ptr(y))
    return y


def _gemm_binary_cpu(x, wbits, alpha, bias, N, K, xnor):
    return _run_cpu("gemm_binary", False, x, wbits, alpha, bias, N, K, xnor)


def _gemm_ternary_cpu(x, wpacked, alpha, bias, N, K):
    return _run_cpu("gemm_ternary", True, x, wpacked, alpha, bias, N, K, False)


LIB.impl("gemm_binary", _gemm_binary_cpu, "CPU")
LIB.impl("gemm_ternary", _gemm_ternary_cpu, "CPU")
