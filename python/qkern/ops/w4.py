"""qkern::gemm_w4: matmul with int4 group-wise weights (docs/numerics.md, "int4 group-wise
matmul").

``y = x @ W^T (+ bias)`` with ``W[n, k] = (q[n, k] - z[n, g]) * s[n, g]``, ``g = k // G``,
codes ``q`` and zero points ``z`` in [-8, 7] (``z = 0``: symmetric), float32 scales ``s``.

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
values: ``(N_pad // 8, K // G, 8)``. csrc/cpu/gemm_w4.h is the reference for this layout.
"""

from __future__ import annotations

import torch

from .. import _C
from .cpu import NonFiniteError
from .schemas import LIB

__all__ = ["MODES", "gemm_w4", "pack_weight", "unpack_weight"]

MODES = {"exact": 0, "fast": 1}

LIB.define(
    "gemm_w4(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, Tensor? bias, int N, "
    "int K, int group_size, int mode) -> Tensor"
)


@torch.library.register_fake("qkern::gemm_w4")
def _(x, packed, scales, zeros, bias, N, K, group_size, mode):
    torch._check(x.dim() >= 1 and x.shape[-1] == K, lambda: "gemm_w4: x must be (..., K)")
    return x.new_empty((*x.shape[:-1], N), dtype=torch.float32)


def _c(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t as a contiguous CPU tensor of dtype (the same tensor when it already is one)."""
    return None if t is None else t.detach().to(dtype).contiguous()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def check_x_and_tiles(op: str, x, scales, zeros, N: int, K: int, group_size: int) -> None:
    """The CPU ops' checks of x and of the scales / zeros tile layout (shared with gemm_w23)."""
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be floating point, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{op}: x must be (..., K = {K}), got shape {tuple(x.shape)}")
    tiles = ((N + 7) // 8, K // group_size if group_size > 0 else 0, 8)
    for name, t in (("scales", scales), ("zeros", zeros)):  # (N, K/G) would be silently wrong
        if t is not None and tuple(t.shape) != tiles:
            raise ValueError(f"{op}: {name} must be in pack_weight's tile layout {tiles}, "
                             f"got shape {tuple(t.shape)}")


def _gemm_w4_cpu(x, packed, scales, zeros, bias, N, K, group_size, mode):
    check_x_and_tiles("gemm_w4", x, scales, zeros, N, K, group_size)
    if packed.dtype != torch.uint8 or packed.numel() != _padded(N) * K // 2:
        raise ValueError(f"gemm_w4: packed must be pack_weight's uint8 buffer of "
                         f"{_padded(N) * K // 2} bytes for N={N}, K={K}, got {packed.dtype} "
                         f"with {packed.numel()} elements")
    if bias is not None and bias.numel() != N:
        raise ValueError(f"gemm_w4: bias has {bias.numel()} elements, expected N = {N}")
    x, packed, scales = _c(x, torch.float32), packed.contiguous(), _c(scales, torch.float32)
    zeros, bias = _c(zeros, torch.int32), _c(bias, torch.float32)
    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32)
    # data_ptr()s of the checked tensors: no numpy round trip per call (decode runs dozens)
    bad = _C.gemm_w4_raw(x.data_ptr(), x.numel() // K, packed.data_ptr(), scales.data_ptr(),
                         _ptr(zeros), _ptr(bias), N, K, group_size, mode, y.data_ptr())
    if bad:
        raise NonFiniteError("gemm_w4: x contains NaN or Inf (the fast mode quantizes x to "
                             "int8; use mode=0 (exact) to propagate them)")
    return y


LIB.impl("gemm_w4", _gemm_w4_cpu, "CPU")


def parse_mode(mode: str | int) -> int:
    """"exact" / 0 or "fast" / 1 (the modes of gemm_w4 and gemm_w23)."""
    m = MODES.get(mode, mode) if isinstance(mode, str) else mode
    if m not in (0, 1):
        raise ValueError(f"mode must be 'exact', 'fast', 0 or 1, got {mode!r}")
    return m


def _padded(n: int) -> int:
    return (n + 7) // 8 * 8


def _check_group(k: int, group_size: int) -> None:
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 32:
        raise ValueError(f"group_size must be a positive multiple of 32 (32, 64, 128), "
                         f"got {group_size!r}")
    if k <= 0 or k % group_size:
        raise ValueError(f"K = {k} must be a positive multiple of group_size {group_size} "
                         "(and so of 32)")


def _check_scales_zeros(scales, zeros, n: int, ng: int, qmin: int, qmax: int,
                        zp_name: str) -> None:
    """pack_weight's checks of scales / zeros (N, K // G), zero points in [qmin, qmax] (shared
    with gemm_w23)."""
    if tuple(scales.shape) != (n, ng):
        raise ValueError(f"scales must be (N, K // group_size) = {(n, ng)}, "
                         f"got {tuple(scales.shape)}")
    if zeros is not None:
        if tuple(zeros.shape) != (n, ng):
            raise ValueError(f"zeros must be (N, K // group_size) = {(n, ng)}, "
                             f"got {tuple(zeros.shape)}")
        if zeros.is_floating_point():
            raise ValueError(f"zeros must be an integer tensor, got {zeros.dtype}")
        if zeros.numel() and (int(zeros.min()) < qmin or int(zeros.max()) > qmax):
            raise ValueError(f"{zp_name} must be in [{qmin}, {qmax}]")


def _to_tiles(p: torch.Tensor, n: int) -> torch.Tensor:
    """(N, G) -> (N_pad // 8, G, 8), padded rows 0."""
    pad = torch.zeros((_padded(n) - n, p.shape[1]), dtype=p.dtype)
    return torch.cat([p, pad]).view(-1, 8, p.shape[1]).transpose(1, 2).contiguous()


def _from_tiles(p: torch.Tensor, n: int) -> torch.Tensor:
    return p.transpose(1, 2).reshape(-1, p.shape[1])[:n].contiguous()


def pack_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                group_size: int = 128) -> dict:
    """Packs int4 codes (N, K) in [-8, 7], float scales (N, K // G) and optional int zero points
    (N, K // G) in [-8, 7] for ``gemm_w4``. Returns ``{"packed": uint8 (N_pad // 8, K // 32,
    128), "scales": float32 (N_pad // 8, K // G, 8), "zeros": int32 like scales or None, "N",
    "K", "group_size"}``."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    n, k = codes.shape
    _check_group(k, group_size)
    c = codes.detach().cpu()
    if c.numel() and (int(c.min()) < -8 or int(c.max()) > 7):
        raise ValueError("codes must be in [-8, 7]")
    _check_scales_zeros(scales, zeros, n, k // group_size, -8, 7, "zero points")
    packed = torch.from_numpy(_C.pack_w4(c.to(torch.int8).contiguous().numpy(), group_size))
    return {
        "packed": packed.view(_padded(n) // 8, k // 32, 128),
        "scales": _to_tiles(scales.detach().cpu().to(torch.float32), n),
        "zeros": None if zeros is None else _to_tiles(zeros.detach().cpu().to(torch.int32), n),
        "N": n,
        "K": k,
        "group_size": group_size,
    }


def unpack_weight(w: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inverse of ``pack_weight``: (codes int8 (N, K), scales (N, K // G), zeros or None)."""
    n, k = w["N"], w["K"]
    codes = torch.from_numpy(_C.unpack_w4(w["packed"].contiguous().numpy(), n, k))
    zeros = None if w["zeros"] is None else _from_tiles(w["zeros"], n)
    return codes, _from_tiles(w["scales"], n), zeros


def gemm_w4(x: torch.Tensor, w: dict, bias: torch.Tensor | None = None,
            mode: str | int = "exact") -> torch.Tensor:
    """``x (..., K) @ W^T (+ bias)`` -> float32 (..., N) for ``w = pack_weight(...)``;
    ``mode``: "exact" (0) or "fast" (1). x may be float32, bfloat16 or float16."""
    return torch.ops.qkern.gemm_w4(x, w["packed"], w["scales"], w["zeros"], bias, w["N"],
                                   w["K"], w["group_size"], parse_mode(mode))
