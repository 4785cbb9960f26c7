"""safetensors files through the ``safetensors`` package: read lazily (the tensors are
memory-mapped, so loading costs no copy of the file) with the ``__metadata__`` dict, and write
atomically (a temporary file in the same folder, fsync, then rename).

Every dtype the package has is accepted (fp8 and uint16/32/64 included); a file the package
rejects (overlapping or uncovered data, bad JSON, unknown dtype...) raises ``ValueError``
naming the path.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["atomic_write", "read_safetensors", "write_safetensors"]

# plain words for the package's commonest complaints (its own message follows them)
_HINTS = {
    "header too small": "too short for a safetensors file",
    "file not fully covered": "the tensors' data_offsets do not cover the data exactly",
    "invalid offset": "the tensors' data_offsets overlap or run out of order",
}


def _invalid(path: str | os.PathLike, e: SafetensorError) -> ValueError:
    msg = str(e).removeprefix("Error while deserializing header: ")
    hint = next((h for k, h in _HINTS.items() if k in msg), None)
    return ValueError(f"{path}: not a valid safetensors file: "
                      + (f"{hint} ({msg})" if hint else msg))


def read_safetensors(path: str | os.PathLike, with_metadata: bool = False):
    """``{name: tensor}`` (and the ``__metadata__`` dict when ``with_metadata``). The tensors
    are memory-mapped from the file (copy-on-write): pages are read when first touched."""
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            tensors = f.get_tensors()
            meta = f.metadata()
    except SafetensorError as e:
        raise _invalid(path, e) from None
    if with_metadata:
        return tensors, dict(meta or {})
    return tensors


def atomic_write(path: str | os.PathLike, write: Callable[[str], object],
                 overwrite: bool = False) -> None:
    """Calls ``write(tmp)`` to fill a temporary file in the folder of ``path``, fsyncs it and
    renames it over the target, so a reader never sees a partial file. Refuses an existing
    path unless ``overwrite``."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} exists; pass overwrite=True to replace it")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"{p.parent} is not a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors, none sharing memory with another (the package refuses shared
    storage; a tensor whose storage was already taken is written as its own copy)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        elif t.numel():
            seen.add(ptr)
        out[name] = t
    return out


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None, overwrite: bool = False) -> None:
    """Writes tensors (copied to the CPU where needed) and string metadata, atomically."""
    if metadata and not all(isinstance(k, str) and isinstance(v, str)
                            for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map str to str")
    flat = _storable(tensors)

    def write(tmp: str) -> None:
        try:
            save_file(flat, tmp, metadata=dict(metadata) if metadata else None)
        except KeyError as e:  # the package has no safetensors name for this dtype
            bad = [n for n, t in flat.items() if t.dtype == e.args[0]]
            if not bad:
                raise
            raise ValueError(f"{bad[0]}: dtype {e.args[0]} cannot be stored in safetensors"
                             ) from None

    atomic_write(path, write, overwrite=overwrite)
