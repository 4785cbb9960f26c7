"""How the CPU ops hand tensors to ``qkern._C``: checked (``checks.py``), contiguous tensors of
the kernel's dtype, passed as ``data_ptr()`` addresses to the ``*_raw`` bindings (no numpy round
trip per call: a decode step runs dozens of small GEMVs). The bindings check shapes and null
pointers again; sizes are the caller's checks."""

from __future__ import annotations

import torch

__all__ = ["contig", "out_tensor", "ptr"]


def contig(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t as a contiguous CPU tensor of dtype (the same tensor when it already is one)."""
    return None if t is None else t.detach().to(dtype).contiguous()


def ptr(t: torch.Tensor | None) -> int:
    """t's address, 0 for None or an empty tensor (the bindings' "none")."""
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def out_tensor(op: str, t: torch.Tensor, n: int, dtypes: tuple, name: str = "out") -> torch.Tensor:
    """A preallocated output of an ``*_out`` op: a contiguous CPU tensor of ``n`` elements and
    one of ``dtypes``, written in place (never converted: a copy would not be the caller's)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{op}: {name} must be on the CPU (like the input), got {t.device}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must be {names}, got {t.dtype}")
    if t.numel() != n:
        raise ValueError(f"{op}: {name} must have {n} elements, got {t.numel()} "
                         f"(shape {tuple(t.shape)})")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")
    return t
