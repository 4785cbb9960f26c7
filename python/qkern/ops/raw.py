"""How the CPU ops hand tensors to ``qkern._C``: checked (``checks.py``), contiguous tensors of
the kernel's dtype, passed as ``data_ptr()`` addresses to the ``*_raw`` bindings (no numpy round
trip per call: a decode step runs dozens of small GEMVs). The bindings check shapes and null
pointers again; sizes are the caller's checks."""

from __future__ import annotations

import torch

__all__ = ["contig", "ptr"]


def contig(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t as a contiguous CPU tensor of dtype (the same tensor when it already is one)."""
    return None if t is None else t.detach().to(dtype).contiguous()


def ptr(t: torch.Tensor | int | None) -> int:
    """t's address, 0 for None or an empty tensor (the bindings' "none"); an int is an address
    taken before (``ptr`` of a tensor the caller keeps alive: Kernel.plan's buffers)."""
    if t is None:
        return 0
    if type(t) is int:
        return t
    return 0 if t.numel() == 0 else t.data_ptr()
