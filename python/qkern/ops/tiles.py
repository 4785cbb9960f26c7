"""The tile layout shared by ``gemm_w4`` and ``gemm_w23``: rows in tiles of 8 (N padded), K in
blocks of 32, scales and zero points stored per tile and group as 8 consecutive values
``(N_pad // 8, K // G, 8)``; the group-size rule of both ops and their ``mode`` argument."""

from __future__ import annotations

import torch

__all__ = ["BLOCK", "MODES", "check_group", "check_scales_zeros", "from_tiles", "group_error",
           "padded", "parse_mode", "split_zeros", "tile_shape", "to_tiles", "zeros_dtype"]

BLOCK = 32  # K runs in blocks of 32 codes (csrc/cpu/gemm/w4/api.h kW4Block, gemm_w23.h kW23Block)
MODES = {"exact": 0, "fast": 1}


def group_error(k: int, group_size: int) -> str | None:
    """Why ``group_size`` cannot group K = ``k`` for the tiled kernels (None when it can): any
    positive multiple of 32 dividing K (the scalar, AVX2 and CUDA paths alike)."""
    if not isinstance(group_size, int) or group_size <= 0 or group_size % BLOCK:
        return f"group_size must be a positive multiple of {BLOCK}, got {group_size!r}"
    if k <= 0 or k % group_size:
        return (f"K = {k} must be a positive multiple of group_size {group_size} "
                f"(and so of {BLOCK})")
    return None


def check_group(k: int, group_size: int, op: str = "") -> None:
    """Raises ValueError (prefixed ``op: `` when given) where :func:`group_error` says why."""
    err = group_error(k, group_size)
    if err is not None:
        raise ValueError(f"{op}: {err}" if op else err)


def check_int_codes(codes: torch.Tensor, group_size: int) -> tuple[int, int]:
    """The tile packers' common argument check: ``codes`` a 2-D (N, K) integer tensor and
    ``group_size`` a valid group of K (:func:`check_group`); returns (N, K)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (N, K), got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    n, k = codes.shape
    check_group(k, group_size)
    return n, k


def parse_mode(mode: str | int) -> int:
    """"exact" / 0 or "fast" / 1 (the modes of gemm_w4 and gemm_w23)."""
    m = MODES.get(mode, mode) if isinstance(mode, str) else mode
    if m not in (0, 1):
        raise ValueError(f"mode must be 'exact', 'fast', 0 or 1, got {mode!r}")
    return m


def padded(n: int) -> int:
    """N rounded up to whole tiles of 8 rows."""
    return (n + 7) // 8 * 8


def tile_shape(n: int, k: int, group_size: int) -> tuple[int, int, int]:
    """Shape of the scales / zeros in the tile layout: (N_pad // 8, K // G, 8)."""
    return ((n + 7) // 8, k // group_size if group_size > 0 else 0, 8)


def check_scales_zeros(scales, zeros, n: int, ng: int, qmin: int, qmax: int,
                       zp_name: str) -> None:
    """pack_weight's checks of scales / zeros (N, K // G): integer zero points in [qmin, qmax],
    or float32 zero points of the stored unsigned code (finite, any value)."""
    if tuple(scales.shape) != (n, ng):
        raise ValueError(f"scales must be (N, K // group_size) = {(n, ng)}, "
                         f"got {tuple(scales.shape)}")
    if zeros is not None:
        if tuple(zeros.shape) != (n, ng):
            raise ValueError(f"zeros must be (N, K // group_size) = {(n, ng)}, "
                             f"got {tuple(zeros.shape)}")
        if zeros.is_floating_point():
            if zeros.dtype != torch.float32:
                raise ValueError(f"float zeros must be float32, got {zeros.dtype}")
            if not bool(torch.isfinite(zeros).all()):
                raise ValueError("float zeros must be finite; they contain NaN or Inf")
            return
        if zeros.numel() and (int(zeros.min()) < qmin or int(zeros.max()) > qmax):
            raise ValueError(f"{zp_name} must be in [{qmin}, {qmax}]")


def to_tiles(p: torch.Tensor, n: int) -> torch.Tensor:
    """(N, G) -> (N_pad // 8, G, 8), padded rows 0."""
    pad = torch.zeros((padded(n) - n, p.shape[1]), dtype=p.dtype)
    return torch.cat([p, pad]).view(-1, 8, p.shape[1]).transpose(1, 2).contiguous()


def from_tiles(p: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`to_tiles`: (N_pad // 8, G, 8) -> (N, G)."""
    return p.transpose(1, 2).reshape(-1, p.shape[1])[:n].contiguous()


def split_zeros(zeros: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The ``zeros`` argument of gemm_w4 / gemm_w23 as (int32 zero points, float32 zero points
    of the stored code): int32 or float32 contiguous, the other None."""
    if zeros is None:
        return None, None
    if zeros.is_floating_point():
        return None, zeros.detach().to(torch.float32).contiguous()
    return zeros.detach().to(torch.int32).contiguous(), None


def zeros_dtype(zeros: torch.Tensor) -> torch.Tensor:
    """Zero points as the kernels store them: float32 when floating point, else int32."""
    return zeros.to(torch.float32 if zeros.is_floating_point() else torch.int32)
