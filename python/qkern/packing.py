"""Bit packing: dense byte streams (``pack_bits``) and GPTQ-style int32 words (``pack_int32``)."""

from __future__ import annotations

import numpy as np
import torch

from ._checks import as_tensor, check_bits, normalize_axis

ORDERS = ("lsb", "msb")
_OPS = torch.ops.qkern


def _codes_u8(codes, name="codes") -> tuple[torch.Tensor, bool]:
    was_numpy = isinstance(codes, np.ndarray)
    t = as_tensor(codes, name)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dtype not in (torch.uint8, torch.int8):
        t = t.to(torch.int64).bitwise_and(0xFF).to(torch.uint8)
    return t.contiguous().view(torch.uint8).reshape(-1), was_numpy


def _order(order: str) -> bool:
    if order not in ORDERS:
        raise ValueError(f"order must be 'lsb' or 'msb', got {order!r}")
    return order == "msb"


def pack_bits(codes, bits: int, order: str = "lsb"):
    """Pack the low ``bits`` bits of every code into one dense stream of bytes."""
    check_bits(bits)
    msb = _order(order)
    t, was_numpy = _codes_u8(codes)
    out = _OPS.pack_bits(t, bits, msb)
    return out.numpy() if was_numpy else out


def unpack_bits(packed, bits: int, n: int, order: str = "lsb"):
    """Inverse of pack_bits: ``n`` codes of ``bits`` bits (uint8)."""
    check_bits(bits)
    msb = _order(order)
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    t, was_numpy = _codes_u8(packed, "packed")
    need = (n * bits + 7) // 8
    if t.numel() < need:
        raise ValueError(
            f"packed buffer too short: {t.numel()} bytes, but {n} codes of {bits} bits need {need}"
        )
    out = _OPS.unpack_bits(t, bits, int(n), msb)
    return out.numpy() if was_numpy else out


def pack_int32(codes, bits: int, dim: int = 0):
    """GPTQ-style packing along ``dim``: each line's LSB-first stream of codes cut into
    little-endian int32 words, ceil(len * bits / 32) words per line."""
    check_bits(bits)
    was_numpy = isinstance(codes, np.ndarray)
    t = as_tensor(codes, "codes")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"codes must be an integer tensor, got {t.dtype}")
    if t.dim() == 0:
        raise ValueError("pack_int32 needs a tensor with at least 1 dimension")
    d = normalize_axis(dim, t.dim(), "dim")
    moved = t.movedim(d, -1)
    lines = moved.reshape(-1, moved.shape[-1]) if moved.numel() else moved.reshape(0, moved.shape[-1])
    n = lines.shape[1]
    words = (n * bits + 31) // 32
    out = torch.zeros(lines.shape[0], words * 4, dtype=torch.uint8)
    for i in range(lines.shape[0]):
        packed = pack_bits(lines[i], bits)
        out[i, : packed.numel()] = packed
    res = out.view(torch.int32).reshape(*moved.shape[:-1], words).movedim(-1, d).contiguous()
    return res.numpy() if was_numpy else res


def unpack_int32(packed, bits: int, n: int, dim: int = 0):
    """Inverse of pack_int32: ``n`` codes (uint8) per line along ``dim``."""
    check_bits(bits)
    was_numpy = isinstance(packed, np.ndarray)
    t = as_tensor(packed, "packed")
    if t.dtype != torch.int32:
        raise TypeError(f"packed must be int32, got {t.dtype}")
    d = normalize_axis(dim, t.dim(), "dim")
    moved = t.movedim(d, -1).contiguous()
    lines = moved.reshape(-1, moved.shape[-1]).view(torch.uint8)
    out = torch.stack([unpack_bits(lines[i], bits, n) for i in range(lines.shape[0])]) if lines.shape[0] else torch.zeros(0, n, dtype=torch.uint8)
    res = out.reshape(*moved.shape[:-1], n).movedim(-1, d).contiguous()
    return res.numpy() if was_numpy else res
