"""ITU-T G.711 mu-law and A-law on 16-bit PCM (bit-exact with the standard's reference coder)."""

from __future__ import annotations

import numpy as np
import torch

from ._checks import as_tensor

__all__ = ["alaw_decode", "alaw_encode", "mulaw_decode", "mulaw_encode"]
_OPS = torch.ops.qkern


def _run(op, x, dtype, name):
    was_numpy = isinstance(x, np.ndarray)
    t = as_tensor(x, name)
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    out = op(t.contiguous())
    return out.numpy() if was_numpy else out


def mulaw_encode(pcm):
    """int16 PCM -> uint8 mu-law codes."""
    return _run(_OPS.mulaw_encode, pcm, torch.int16, "pcm")


def mulaw_decode(codes):
    """uint8 mu-law codes -> int16 PCM."""
    return _run(_OPS.mulaw_decode, codes, torch.uint8, "codes")


def alaw_encode(pcm):
    """int16 PCM -> uint8 A-law codes."""
    return _run(_OPS.alaw_encode, pcm, torch.int16, "pcm")


def alaw_decode(codes):
    """uint8 A-law codes -> int16 PCM."""
    return _run(_OPS.alaw_decode, codes, torch.uint8, "codes")
