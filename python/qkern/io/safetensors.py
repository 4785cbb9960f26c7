"""safetensors files through the ``safetensors`` package: read lazily (the tensors are
memory-mapped, so loading costs no copy of the file) with the ``__metadata__`` dict, and write
atomically (a temporary file in the same folder, fsync, then a rename over the target, or a
hard link that fails when the target exists when it must not be replaced).

Every dtype the package has is accepted (fp8 and uint16/32/64 included); a file the package
rejects (overlapping or uncovered data, bad JSON, unknown dtype...) raises ``ValueError``
naming the path.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["atomic_write", "read_safetensors", "stale_temp_files", "write_safetensors"]

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


def _claim_excl(tmp: str, path: Path) -> None:
    """The last resort where hard links are not supported (FAT, some FUSE and SMB mounts): the
    name is claimed atomically by an ``O_EXCL`` create, then the finished file is renamed over
    the claim. A reader may see an empty file between the two steps."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # FileExistsError if taken
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(path)
        raise


# errors of os.link on a file system (or OS) without hard links
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK,
             errno.EXDEV, errno.EACCES}


def _publish_no_replace(tmp: str, path: Path) -> None:
    """Gives the finished ``tmp`` the name ``path`` unless ``path`` exists, in one atomic step
    (a hard link, which fails when the name is taken, then the temporary name is removed): of
    several processes saving to the same new path exactly one succeeds, the others get
    FileExistsError."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        _claim_excl(tmp, path)
        return
    os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    """Makes the new directory entry durable (best effort: not every OS opens folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# temporary files: ".<target name>.<pid>@<host>.<random>.qkern-tmp" in the target's folder, so
# that the next save to the same target finds (and removes) those of a killed process
TMP_SUFFIX = ".qkern-tmp"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _pid_alive(pid: int) -> bool:
    if os.name != "posix" or pid <= 0:
        return True  # cannot tell: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, someone else's
        return True
    return True


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """The temporary files that saves to ``path`` on this host left behind: those whose
    process is gone (killed mid-write). Files of live processes and of other targets are not
    listed."""
    p = Path(path)
    prefix, host = f".{p.name}.", _host()
    out = []
    try:
        entries = list(os.scandir(p.parent))
    except OSError:
        return out
    for entry in entries:
        n = entry.name
        if not (n.startswith(prefix) and n.endswith(TMP_SUFFIX)):
            continue
        parts = n[len(prefix):-len(TMP_SUFFIX)].split(".")
        if len(parts) != 2:  # another target's ("<name>.<more>")
            continue
        pid, _, their_host = parts[0].partition("@")
        if pid.isdigit() and their_host == host and not _pid_alive(int(pid)):
            out.append(p.parent / n)
    return out


def _remove_stale_temps(p: Path) -> None:
    for f in stale_temp_files(p):
        try:
            os.unlink(f)
        except OSError:
            pass


def _create_temp(p: Path) -> tuple[str, int]:
    """A new empty temporary file for ``p`` and its permissions: created with mode 0o666, so
    the OS applies the umask (and any default ACL) as for a normal file write."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = p.parent / f".{p.name}.{os.getpid()}@{_host()}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return str(tmp), mode
    raise FileExistsError(f"could not create a temporary file next to {p}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], object],
                 overwrite: bool = False) -> None:
    """Calls ``write(tmp)`` to fill a temporary file in the folder of ``path``, fsyncs it and
    gives it the name ``path``, so a reader never sees a partial file: renamed over the target
    with ``overwrite=True``; otherwise linked to it in one atomic step that fails with
    FileExistsError when ``path`` exists (two processes saving to one new path: exactly one
    wins). The file gets the mode a normal write gives (0o666 less the umask; an overwritten
    file keeps its mode). The temporary file is named
    ``.<name>.<pid>@<host>.<random>.qkern-tmp``; those of processes killed mid-write are
    removed by the next save to the same path."""
    p = Path(path)
    if p.exists() and not overwrite:  # early answer; _publish_no_replace is the real check
        raise FileExistsError(f"{p} exists; pass overwrite=True to replace it")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"{p.parent} is not a directory")
    _remove_stale_temps(p)
    tmp, mode = _create_temp(p)
    try:
        write(tmp)
        if overwrite:  # a normal write over an existing file keeps its permissions
            try:
                mode = stat.S_IMODE(os.stat(p).st_mode) & 0o777
            except OSError:
                pass
        # write() may have replaced the file (the safetensors package creates it 0o600)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, p)
        else:
            _publish_no_replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(p.parent)


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
