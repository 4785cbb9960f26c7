"""safetensors checkpoints read and written one tensor at a time, for models larger than the
memory at hand (``qkern.quantize_pretrained``).

- :class:`Checkpoint`: the tensors of a transformers model folder (``model.safetensors``, or
  shards listed by ``model.safetensors.index.json``), found from the files' headers; ``read``
  gives one tensor, read from its file with a positioned read of exactly its bytes. Nothing is
  memory-mapped: a mapping of a whole shard counts in the process's address space (what
  ``RLIMIT_AS`` limits) even where only one tensor of it is touched.
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

from .safetensors import atomic_write

__all__ = ["DTYPES", "Checkpoint", "TensorInfo", "read_header", "write_streamed"]

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
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index (no weight_map: {e})"
                                 ) from None
            files = sorted(set(wmap.values()))
        elif single.is_file():
            wmap, files = None, [single.name]
        else:
            raise FileNotFoundError(f"{self.folder}: no model.safetensors or "
                                    "model.safetensors.index.json (safetensors checkpoints only)")
        self.files = [self.folder / f for f in files]
        self.tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: a shard the index lists is missing")
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
