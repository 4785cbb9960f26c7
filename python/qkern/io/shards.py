"""Checkpoints as one safetensors file or as transformers' sharded layout
(``model.safetensors.index.json``, whose ``weight_map`` names the shard of every tensor, plus
the shard files), read memory-mapped through ``safetensors.safe_open``: no tensor is copied
until it is used.

:func:`read_checkpoint` takes a ``.safetensors`` file, an ``*.index.json`` file, or a folder
holding ``model.safetensors.index.json`` (and its shards), ``model.safetensors``, or other
``*.safetensors`` files (read as one checkpoint); ``qkern.models``' folder readers use it.
The metadata of a sharded checkpoint is the index's ``metadata`` (string values) merged
with the shards' headers' ``__metadata__`` (which must agree where they overlap).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .safetensors import read_safetensors

__all__ = ["checkpoint_files", "read_checkpoint", "read_owned"]

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


def _header(f) -> tuple[dict, int]:
    """The safetensors header of open file ``f`` and where its data starts."""
    n = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(n)), 8 + n


def read_owned(path: str | os.PathLike, like: dict[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """Copies of the tensors ``like`` names, of their dtypes and shapes (``like``: views
    :func:`read_checkpoint` gave, so the file is already checked), read with plain file reads
    into memory of their own (aligned, writable, independent of the file): no page of the
    file is mapped, so the peak is the copies alone, not copies plus mapped pages."""
    out: dict[str, torch.Tensor] = {}
    for path_ in checkpoint_files(path):
        with open(path_, "rb") as f:
            header, start = _header(f)
            for k, info in header.items():
                ref = like.get(k)
                if k == "__metadata__" or ref is None:
                    continue
                b, e = info["data_offsets"]
                buf = torch.empty(e - b, dtype=torch.uint8)
                f.seek(start + b)
                if e > b and f.readinto(memoryview(buf.numpy())) != e - b:
                    raise ValueError(f"{path_}: tensor {k!r} is cut short")
                t = buf.view(ref.dtype) if e > b else torch.empty(0, dtype=ref.dtype)
                out[k] = t.reshape(ref.shape)
    return out
