"""Bit packing: dense byte streams (``pack_bits``) and GPTQ-style int32 words (``pack_int32``)."""

from __future__ import annotations

import math

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
    if isinstance(packed, (np.ndarray, torch.Tensor)) and packed.dtype not in (
            np.uint8, np.int8, torch.uint8, torch.int8):
        raise TypeError(f"packed must be a byte buffer (uint8 or int8, as pack_bits returns), "
                        f"got {packed.dtype}: a wider integer would lose its high bytes")
    t, was_numpy = _codes_u8(packed, "packed")
    need = (n * bits + 7) // 8
    if t.numel() < need:
        raise ValueError(
            f"packed buffer too short: {t.numel()} bytes, but {n} codes of {bits} bits need {need}"
        )
    out = _OPS.unpack_bits(t, bits, int(n), msb)
    return out.numpy() if was_numpy else out


def _padded_len(n: int, bits: int) -> int:
    """Smallest length >= n whose codes fill whole 32-bit words."""
    step = 32 // math.gcd(bits, 32)
    return -(-n // step) * step


def _empty_result(lead: torch.Size, last: int, d: int, dtype, was_numpy: bool):
    res = torch.zeros(*lead, last, dtype=dtype).movedim(-1, d).contiguous()
    return res.numpy() if was_numpy else res


def pack_int32(codes, bits: int, dim: int = 0):
    """GPTQ-style packing along ``dim``: each line's LSB-first stream of codes cut into
    little-endian int32 words, ceil(len * bits / 32) words per line (zero padded)."""
    check_bits(bits)
    was_numpy = isinstance(codes, np.ndarray)
    t = as_tensor(codes, "codes")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {t.dtype}")
    if t.dim() == 0:
        raise ValueError("pack_int32 needs a tensor with at least 1 dimension")
    d = normalize_axis(dim, t.dim(), "dim")
    moved = t.movedim(d, -1)
    n = moved.shape[-1]
    words = (n * bits + 31) // 32
    if moved.numel() == 0:
        return _empty_result(moved.shape[:-1], words, d, torch.int32, was_numpy)
    lines = moved.reshape(-1, n)
    npad = _padded_len(n, bits)
    if npad != n:  # pad every line so that lines start on word boundaries of one stream
        lines = torch.cat([lines, lines.new_zeros(lines.shape[0], npad - n)], dim=1)
    flat, _ = _codes_u8(lines)
    packed = pack_bits(flat, bits).view(torch.int32).view(lines.shape[0], npad * bits // 32)
    res = packed[:, :words].reshape(*moved.shape[:-1], words).movedim(-1, d).contiguous()
    return res.numpy() if was_numpy else res


def unpack_int32(packed, bits: int, n: int, dim: int = 0):
    """Inverse of pack_int32: ``n`` codes (uint8) per line along ``dim``."""
    check_bits(bits)
    was_numpy = isinstance(packed, np.ndarray)
    t = as_tensor(packed, "packed")
    if t.dtype != torch.int32:
        raise TypeError(f"packed must be int32, got {t.dtype}")
    if t.dim() == 0:
        raise ValueError("unpack_int32 needs a tensor with at least 1 dimension")
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    d = normalize_axis(dim, t.dim(), "dim")
    moved = t.movedim(d, -1).contiguous()
    words = moved.shape[-1]
    if words * 32 < n * bits:
        raise ValueError(
            f"packed buffer too short: {words} words per line, but {n} codes of {bits} bits "
            f"need {(n * bits + 31) // 32}"
        )
    if moved.shape[:-1].numel() == 0 or n == 0:
        return _empty_result(moved.shape[:-1], n, d, torch.uint8, was_numpy)
    lines = moved.reshape(-1, words)
    npad = _padded_len(n, bits)
    wpad = npad * bits // 32
    if wpad > words:
        lines = torch.cat([lines, lines.new_zeros(lines.shape[0], wpad - words)], dim=1)
    lines = lines[:, :wpad].contiguous()
    out = unpack_bits(lines.reshape(-1).view(torch.uint8), bits, lines.shape[0] * npad)
    res = out.view(lines.shape[0], npad)[:, :n].reshape(*moved.shape[:-1], n).movedim(-1, d)
    res = res.contiguous()
    return res.numpy() if was_numpy else res
