"""How the CPU ops hand tensors to ``qkern._C``: checked (``checks.py``), contiguous tensors of
the kernel's dtype, passed as ``data_ptr()`` addresses to the ``*_raw`` bindings (no numpy round
trip per call: a decode step runs dozens of small GEMVs). The bindings check shapes and null
pointers again; sizes are the caller's checks."""

from __future__ import annotations

import ctypes
import sys

import torch

__all__ = ["contig", "empty", "out_tensor", "ptr"]


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


_HUGE = 1 << 21
_MADV_HUGEPAGE = 14
_LIBC = None
if sys.platform.startswith("linux"):
    try:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):  # no madvise: plain pages
        _LIBC = None


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty`` whose large allocations (>= 4 MiB) ask for transparent huge pages before
    their first touch: the kernels then fault 2 MiB pages, not 4 KiB ones (a fresh 64 MiB
    output costs ~3x less to write). torch's own allocator does so only with
    THP_MEM_ALLOC_ENABLE=1; numpy always does."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if _LIBC is not None and nbytes >= 2 * _HUGE:
        a = t.data_ptr()
        lo, hi = (a + _HUGE - 1) & ~(_HUGE - 1), (a + nbytes) & ~(_HUGE - 1)
        if hi > lo:
            _LIBC.madvise(lo, hi - lo, _MADV_HUGEPAGE)  # advice only: errors are ignored
    return t
