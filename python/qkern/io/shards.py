"""Checkpoints as one safetensors file or as transformers' sharded layout
(``model.safetensors.index.json``, whose ``weight_map`` names the shard of every tensor, plus
the shard files), read memory-mapped through ``safetensors.safe_open``: no tensor is copied
until it is used.

:func:`read_checkpoint` takes a ``.safetensors`` file, an ``*.index.json`` file, or a folder
holding ``model.safetensors`` or ``model.safetensors.index.json``. The metadata of a sharded
checkpoint is the index's ``metadata`` (string values) merged with the shards' headers'
``__metadata__`` (which must agree where they overlap).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .safetensors import read_safetensors

__all__ = ["checkpoint_files", "read_checkpoint", "read_owned"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _index_path(path: Path) -> Path | None:
    if path.is_dir():
        if (path / INDEX).is_file():
            return path / INDEX
        if (path / SINGLE).is_file():
            return None
        raise FileNotFoundError(f"{path}: a folder with neither {SINGLE} nor {INDEX}")
    if path.name.endswith(".index.json"):
        return path
    return None


def _read_index(index: Path) -> tuple[dict[str, str], dict]:
    try:
        d = json.loads(index.read_text())
    except OSError:
        raise
    except ValueError as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from None
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not wm or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise ValueError(f"{index}: needs a non-empty 'weight_map' object {{tensor: shard file}}")
    for shard in set(wm.values()):
        if Path(shard).name != shard:
            raise ValueError(f"{index}: shard {shard!r} is not a file name in the index's folder")
    meta = d.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{index}: 'metadata' must be an object")
    return wm, {k: v for k, v in meta.items() if isinstance(v, str)}


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of the checkpoint at ``path`` (one, or the index's shards in
    name order)."""
    p = Path(path)
    index = _index_path(p)
    if index is None:
        return [p / SINGLE if p.is_dir() else p]
    wm, _ = _read_index(index)
    return [index.parent / s for s in sorted(set(wm.values()))]


def read_checkpoint(path: str | os.PathLike, with_metadata: bool = False):
    """``{name: tensor}`` of the checkpoint at ``path`` (memory-mapped; and the metadata
    dict when ``with_metadata``). A sharded checkpoint must be consistent: every tensor of
    the ``weight_map`` in the shard it names, no tensor in two shards, no shard tensor the
    index leaves out; otherwise ValueError naming the file and the tensors."""
    p = Path(path)
    index = _index_path(p)
    if index is None:
        return read_safetensors(p / SINGLE if p.is_dir() else p, with_metadata=with_metadata)
    wm, meta = _read_index(index)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(wm.values())):
        f = index.parent / shard
        if not f.is_file():
            raise FileNotFoundError(f"{index}: shard {shard} is missing")
        part, m = read_safetensors(f, with_metadata=True)
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise ValueError(f"{f}: tensors also in another shard: {twice[:8]}")
        stray = sorted(k for k in part if wm.get(k) != shard)
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


def read_owned(path: str | os.PathLike, keys=None,
               window: int = 64 * 2**20) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the checkpoint at ``path`` (the ``keys`` given, or all) copied
    into memory of their own (aligned, writable, independent of the file). The file is
    opened anew after every ``window`` bytes read, so the mapped pages an open handle keeps
    resident are let go: the peak is the copies plus one window (or one tensor), not twice
    the checkpoint. Read after :func:`read_checkpoint` has checked the layout."""
    want = None if keys is None else set(keys)
    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(path):
        todo: list[str] | None = None
        while todo is None or todo:
            try:
                with safe_open(os.fspath(f), framework="pt", device="cpu") as h:
                    if todo is None:
                        todo = [k for k in reversed(list(h.keys())) if want is None or k in want]
                    read = 0
                    while todo and read < window:
                        k = todo.pop()
                        t = h.get_tensor(k)
                        read += t.numel() * t.element_size()
                        out[k] = t.clone()
                        del t
            except SafetensorError as e:
                raise ValueError(f"{f}: not a valid safetensors file: {e}") from None
            del h  # the handle holds the file's mapping
    return out
