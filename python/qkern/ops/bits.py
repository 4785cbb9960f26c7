"""1-bit (binary) and 1.58-bit (ternary) weight matmuls, one scale per output channel.

``gemm_binary(x, wbits, alpha, bias, N, K, xnor)``: weights ``w = alpha[n] * b[n, k]`` with
``b`` in {+1, -1} (binary code 0 -> +1, 1 -> -1, as the ``binary`` format). With
``xnor=False`` the float32 activations are summed with signs (no multiplies per weight); with
``xnor=True`` they are binarized per row (bit = ``x < 0``, ``beta[m] = mean|x[m]|``) and
``y = alpha[n] * beta[m] * (K - 2 * popcount(xbits ^ wbits))`` (XNOR-Net), exact in integers.

``gemm_ternary(x, wpacked, alpha, bias, N, K)``: ``w = alpha[n] * t[n, k]``, ``t`` in {-1, 0, 1}.

``x`` is ``(..., K)``; the result is float32 ``(..., N)``. Pack the weights with
:func:`pack_binary` / :func:`pack_ternary` (layout in ``csrc/cpu/gemm_bits.h``).
"""

from __future__ import annotations

import torch

from .. import _C
from .schemas import LIB

LIB.define(
    "gemm_binary(Tensor x, Tensor wbits, Tensor alpha, Tensor? bias, int N, int K, bool xnor) "
    "-> Tensor"
)
LIB.define(
    "gemm_ternary(Tensor x, Tensor wpacked, Tensor alpha, Tensor? bias, int N, int K) -> Tensor"
)


def words(k: int) -> int:
    """uint64 words per packed row of ``k`` weights."""
    return (k + 63) // 64


def _pack_rows(bits: torch.Tensor) -> torch.Tensor:
    """(N, K) bool -> (N, KW, 8) uint8: LSB-first bit stream per row, zero padded to 64*KW."""
    n, k = bits.shape
    kw = words(k)
    padded = torch.zeros((n, kw * 64), dtype=torch.uint8, device=bits.device)
    padded[:, :k] = bits.to(torch.uint8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=bits.device))
    packed = (padded.view(n, kw * 8, 8).to(torch.int32) * weights).sum(-1)
    return packed.to(torch.uint8).view(n, kw, 8)


def pack_binary(codes: torch.Tensor) -> torch.Tensor:
    """Binary codes ``(N, K)`` (0 -> +1, 1 -> -1) -> ``wbits`` uint8 ``(N, 8 * ceil(K/64))``."""
    if codes.dim() != 2:
        raise ValueError(f"pack_binary: codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    c = codes.to(torch.int32)
    if c.numel() and (c.min() < 0 or c.max() > 1):
        raise ValueError("pack_binary: codes must be 0 (+1) or 1 (-1)")
    n = codes.shape[0]
    return _pack_rows(c == 1).reshape(n, -1).contiguous()


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes ``(N, K)`` in {-1, 0, 1} -> ``wpacked`` uint8 ``(N, 16 * ceil(K/64))``
    (per 64 weights: the nonzero mask word, then the negative mask word)."""
    if codes.dim() != 2:
        raise ValueError(f"pack_ternary: codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    c = codes.to(torch.int32)
    if c.numel() and (c.min() < -1 or c.max() > 1):
        raise ValueError("pack_ternary: codes must be in {-1, 0, 1}")
    n = codes.shape[0]
    both = torch.stack([_pack_rows(c != 0), _pack_rows(c < 0)], dim=2)  # (N, KW, 2, 8)
    return both.reshape(n, -1).contiguous()


def _out_shape(x: torch.Tensor, n: int) -> tuple[int, ...]:
    return (*x.shape[:-1], n)


def _check(op: str, x, w, alpha, bias, n: int, k: int, row_bytes: int) -> None:
    torch._check(x.dim() >= 1 and x.shape[-1] == k,
                 lambda: f"{op}: x must be (..., K={k}), got {tuple(x.shape)}")
    torch._check(x.dtype == torch.float32, lambda: f"{op}: x must be float32, got {x.dtype}")
    torch._check(w.dtype == torch.uint8, lambda: f"{op}: packed weight must be uint8")
    torch._check(w.numel() == n * row_bytes,
                 lambda: f"{op}: packed weight has {w.numel()} bytes, expected {n * row_bytes}")
    torch._check(alpha.numel() == n, lambda: f"{op}: alpha must have N={n} elements")
    torch._check(bias is None or bias.numel() == n, lambda: f"{op}: bias must have N={n} elements")


@torch.library.register_fake("qkern::gemm_binary")
def _(x, wbits, alpha, bias, N, K, xnor):
    _check("gemm_binary", x, wbits, alpha, bias, N, K, 8 * words(K))
    return x.new_empty(_out_shape(x, N), dtype=torch.float32)


@torch.library.register_fake("qkern::gemm_ternary")
def _(x, wpacked, alpha, bias, N, K):
    _check("gemm_ternary", x, wpacked, alpha, bias, N, K, 16 * words(K))
    return x.new_empty(_out_shape(x, N), dtype=torch.float32)


def _np(t: torch.Tensor | None, dtype: torch.dtype):
    return None if t is None else t.detach().to(dtype).contiguous().numpy()


def _gemm_binary_cpu(x, wbits, alpha, bias, N, K, xnor):
    _check("gemm_binary", x, wbits, alpha, bias, N, K, 8 * words(K))
    y = _C.gemm_binary(_np(x, torch.float32), _np(wbits, torch.uint8),
                       _np(alpha, torch.float32), _np(bias, torch.float32), N, K, xnor)
    return torch.from_numpy(y).view(_out_shape(x, N))


def _gemm_ternary_cpu(x, wpacked, alpha, bias, N, K):
    _check("gemm_ternary", x, wpacked, alpha, bias, N, K, 16 * words(K))
    y = _C.gemm_ternary(_np(x, torch.float32), _np(wpacked, torch.uint8),
                        _np(alpha, torch.float32), _np(bias, torch.float32), N, K)
    return torch.from_numpy(y).view(_out_shape(x, N))


LIB.impl("gemm_binary", _gemm_binary_cpu, "CPU")
LIB.impl("gemm_ternary", _gemm_ternary_cpu, "CPU")
