"""Checkpoints as one safetensors file or as transformers' sharded layout
(``model.safetensors.index.json``, whose ``weight_map`` names the shard of every tensor, plus
the shard files).

- :func:`read_checkpoint` takes a ``.safetensors`` file, an ``*.index.json`` file, or a folder
  holding ``model.safetensors.index.json`` (and its shards), ``model.safetensors``, or other
  ``*.safetensors`` files (read as one checkpoint), memory-mapped through
  ``safetensors.safe_open`` (``qkern.load`` and ``qkern.models``' folder readers use it). The
  metadata of a sharded checkpoint is the index's ``metadata`` (string values) merged with the
  shards' headers' ``__metadata__`` (which must agree where they overlap).
- :class:`Checkpoint` (``qkern.quantize_pretrained``, models larger than the memory at hand):
  the tensors of a model folder found from the files' headers; ``read`` gives one tensor, read
  with a positioned read of exactly its bytes. Nothing is memory-mapped: a mapping of a whole
  shard counts in the process's address space (what ``RLIMIT_AS`` limits) even where only one
  tensor of it is touched.
- :func:`write_streamed`: a safetensors file written atomically from ``{name: (dtype,
  shape)}`` and a function giving each tensor in turn, so only one tensor is in memory at a
  time (the ``safetensors`` package's writer serializes the whole dict into one buffer).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .safetensors import atomic_write, read_safetensors

__all__ = ["DTYPES", "Checkpoint", "TensorInfo", "checkpoint_files", "read_checkpoint",
           "read_header", "read_owned", "write_streamed"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _index_path(path: Path) -> Path | None:
    if path.is_dir():
        return path / INDEX if (path / INDEX).is_file() else None
    return path if path.name.endswith(".index.json") else None


def _read_index(index: Path) -> tuple[dict[str, str], dict]:
    try:
        d = json.loads(index.read_text())
        wm = d["weight_map"]
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in wm.items()):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{index}: not a safetensors index (a JSON object with a "
                         "'weight_map' {tensor name: file name})") from None
    for shard in set(wm.values()):
        if Path(shard).name != shard:
            raise ValueError(f"{index}: shard {shard!r} is not a file name in the index's folder")
    meta = d.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{index}: 'metadata' must be an object")
    return wm, {k: v for k, v in meta.items() if isinstance(v, str)}


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of the checkpoint at ``path``: the shards an index names (each
    must be there), else a folder's ``model.safetensors``, else every ``*.safetensors`` of
    the folder (name order); a file is itself."""
    p = Path(path)
    index = _index_path(p)
    if index is not None:
        files = sorted(set(_read_index(index)[0].values()))
        missing = [f for f in files if not (index.parent / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index.parent}: shards named by {index.name} are "
                                    f"missing: {missing}")
        return [index.parent / f for f in files]
    if not p.is_dir():
        return [p]
    if (p / SINGLE).is_file():
        return [p / SINGLE]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{p}: no {SINGLE}, {INDEX} or *.safetensors")
    return files


def read_checkpoint(path: str | os.PathLike, with_metadata: bool = False):
    """``{name: tensor}`` of the checkpoint at ``path`` (memory-mapped; and the metadata
    dict when ``with_metadata``). Its files (:func:`checkpoint_files`) must be consistent: no
    tensor in two files, and with an index every tensor of the ``weight_map`` in the shard
    it names and no shard tensor the index leaves out; otherwise ValueError naming the file
    and the tensors."""
    p = Path(path)
    index = _index_path(p)
    wm, meta = _read_index(index) if index is not None else ({}, {})
    tensors: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(p):
        part, m = read_safetensors(f, with_metadata=True)
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise ValueError(f"{f}: tensors {twice[:5]} are in another shard too")
        stray = sorted(k for k in part if index is not None and wm.get(k) != f.name)
        if stray:
            raise ValueError(f"{f}: tensors the index does not place in this shard: "
                             f"{stray[:8]}")
        for k, v in m.items():
            if k in meta and meta[k] != v:
                raise ValueError(f"{f}: metadata {k!r} differs from the index's or another "
                                 "shard's")
            meta[k] = v
        tensors.update(part)
    lost = sorted(k for k in wm if k not in tensors)
    if lost:
        raise ValueError(f"{index}: tensors of the weight_map missing from their shards: "
                         f"{lost[:8]}")
    return (tensors, meta) if with_metadata else tensors


#: safetensors dtype names -> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16,
          "U32": torch.uint32, "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn,
          "F8_E5M2": torch.float8_e5m2}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # the safetensors package's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file, dtype, shape and absolute byte range."""
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """``({name: TensorInfo}, metadata)`` of a safetensors file, from its header alone;
    ValueError naming the path when the header is malformed."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{p}: not a safetensors file (header size {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{p}: the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{p}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    out, base = {}, 8 + n
    for name, d in header.items():
        try:
            dtype = DTYPES[d["dtype"]]
            shape = tuple(int(x) for x in d["shape"])
            b, e = (int(x) for x in d["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{p}: tensor {name!r}: bad header entry {json.dumps(d)[:120]} "
                             f"(dtypes read: {sorted(DTYPES)})") from None
        numel = 1
        for x in shape:
            numel *= x
        if min(shape, default=0) < 0 or e - b != numel * dtype.itemsize or b < 0 \
                or base + e > size:
            raise ValueError(f"{p}: tensor {name!r}: data_offsets {[b, e]} do not fit its "
                             f"shape {list(shape)} {d['dtype']} in a {size}-byte file")
        out[name] = TensorInfo(p, dtype, shape, base + b, base + e)
    return out, meta


class Checkpoint:
    """The tensors of a transformers model folder: ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` lists (every name of its weight map must be in its
    file). ``read(name)`` gives one tensor (a fresh CPU tensor of the stored dtype)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index, single = self.folder / INDEX, self.folder / SINGLE
        if not index.is_file() and not single.is_file():
            raise FileNotFoundError(f"{self.folder}: no {SINGLE} or {INDEX} (safetensors "
                                    "checkpoints only)")
        wmap = _read_index(index)[0] if index.is_file() else None
        self.files = checkpoint_files(self.folder)
        self.tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            infos, _ = read_header(f)
            self.tensors.update(infos)
        for name, f in (wmap or {}).items():
            info = self.tensors.get(name)
            if info is None or info.file.name != Path(f).name:
                raise ValueError(f"{index}: tensor {name!r} is not in {f}")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def fingerprint(self) -> dict[str, int]:
        """{file name: size in bytes}: what a resumed run checks it reads the same files."""
        return {f.name: f.stat().st_size for f in self.files}

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            got = f.readinto(memoryview(raw.numpy())) if info.nbytes else 0
        if got != info.nbytes:
            raise ValueError(f"{info.file}: tensor {name!r} is cut short ({got} of "
                             f"{info.nbytes} bytes)")
        return raw.view(info.dtype).reshape(info.shape)


def write_streamed(path: str | os.PathLike, specs: dict[str, tuple[torch.dtype, tuple]],
                   get: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None,
                   overwrite: bool = False) -> int:
    """Writes a safetensors file atomically (``io.safetensors.atomic_write``) holding one
    tensor in memory at a time: the header from ``specs`` ({name: (dtype, shape)}), then
    ``get(name)`` for each name in turn (it must match its spec). Tensors are laid out as the
    safetensors package lays them out (by decreasing alignment, then name), so each is
    aligned. Returns the bytes of tensor data."""
    order = sorted(specs, key=lambda k: (-specs[k][0].itemsize, k))
    header, off = {}, 0
    for k in order:
        dtype, shape = specs[k]
        if dtype not in _NAMES:
            raise ValueError(f"{k}: dtype {dtype} cannot be stored in safetensors")
        n = dtype.itemsize
        for x in shape:
            n *= int(x)
        header[k] = {"dtype": _NAMES[dtype], "shape": [int(x) for x in shape],
                     "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for k in order:
                t = get(k).detach().cpu().contiguous()
                dtype, shape = specs[k]
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{k}: got {t.dtype} {tuple(t.shape)}, the header says "
                                     f"{dtype} {tuple(shape)}")
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                del t  # before the next one is read

    atomic_write(path, write, overwrite=overwrite)
    return off


def read_owned(path: str | os.PathLike, like: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """Copies of the tensors ``like`` names, of their dtypes and shapes (``like``: views
    :func:`read_checkpoint` gave, so the file is already checked), read with plain file reads
    into memory of their own (aligned, writable, independent of the file): no page of the
    file is mapped, so the peak is the copies alone, not copies plus mapped pages."""
    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(path):
        infos, _ = read_header(f)
        with open(f, "rb") as fh:
            for k, info in infos.items():
                ref = like.get(k)
                if ref is None:
                    continue
                buf = torch.empty(info.nbytes, dtype=torch.uint8)
                fh.seek(info.start)
                if info.nbytes and fh.readinto(memoryview(buf.numpy())) != info.nbytes:
                    raise ValueError(f"{f}: tensor {k!r} is cut short")
                t = buf.view(ref.dtype) if info.nbytes else torch.empty(0, dtype=ref.dtype)
                out[k] = t.reshape(ref.shape)
    return out
