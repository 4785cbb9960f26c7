"""One block's calibration inputs, in memory or on disk.

:class:`ActivationStore` is the ``inputs`` sequence the per-block step
(:func:`~qkern.quantization.sequential.quantize_block_copy`) reads: one
:class:`~qkern.quantization.registry.Batch` per calibration batch. It keeps them in memory
until their size passes ``memory_limit`` bytes; from then on every batch is a file of its
folder (``torch.save`` of its args / kwargs), loaded when it is read, one at a time. With
``checkpoint=True`` every batch is also written to the folder as it comes, so a run killed
later restarts from the folder (:meth:`ActivationStore.open`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..quantization.registry import Batch

__all__ = ["ActivationStore", "batch_bytes", "iter_tensors"]


def iter_tensors(v) -> Iterator[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, (tuple, list)):
        for x in v:
            yield from iter_tensors(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from iter_tensors(x)


def batch_bytes(batch: Batch) -> int:
    """Bytes of the tensors in a batch's args and kwargs."""
    return sum(t.numel() * t.element_size() for t in iter_tensors((batch.args, batch.kwargs)))


class ActivationStore(Sequence):
    """A block's inputs: ``append`` them in order, then read them as a sequence (indexing,
    slicing, iteration). ``folder``: where batches go when they are offloaded or
    checkpointed (created when first needed); ``memory_limit``: bytes kept in memory at most
    (None: no limit)."""

    def __init__(self, folder: Path | None, memory_limit: int | None = None,
                 checkpoint: bool = False):
        if (checkpoint or memory_limit is not None) and folder is None:
            raise ValueError("an offloaded or checkpointed store needs a folder")
        self.folder, self.limit, self.checkpoint = folder, memory_limit, checkpoint
        self.memory: list[Batch] | None = []  # None once offloaded
        self.count = 0
        self.nbytes = 0

    @property
    def offloaded(self) -> bool:
        return self.memory is None

    def _file(self, i: int) -> Path:
        return self.folder / f"batch-{i:06d}.pt"

    def _save(self, i: int, batch: Batch) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".batch-{i:06d}.pt.tmp"
        torch.save({"args": batch.args, "kwargs": batch.kwargs}, tmp)
        os.replace(tmp, self._file(i))  # a killed run leaves whole files only

    def _load(self, i: int) -> Batch:
        try:
            d = torch.load(self._file(i), weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self._file(i)}: an offloaded activation batch is "
                                    "missing (was the folder removed?)") from None
        return Batch(tuple(d["args"]), dict(d["kwargs"]))

    def append(self, batch: Batch) -> None:
        size = batch_bytes(batch)
        if not self.offloaded and self.limit is not None and self.nbytes + size > self.limit:
            if not self.checkpoint:  # the batches so far are on disk already otherwise
                for i, b in enumerate(self.memory):
                    self._save(i, b)
            self.memory = None
        if self.offloaded or self.checkpoint:
            self._save(self.count, batch)
        if not self.offloaded:
            self.memory.append(batch)
        self.count += 1
        self.nbytes += size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError(f"batch {i} of {self.count}")
        return self._load(i) if self.offloaded else self.memory[i]

    def __iter__(self) -> Iterator[Batch]:
        for i in range(self.count):
            yield self[i]

    @classmethod
    def open(cls, folder: Path, count: int, memory_limit: int | None) -> ActivationStore:
        """The checkpointed store of ``count`` batches in ``folder`` (a resumed run): read
        into memory when they fit ``memory_limit``, else left on disk."""
        store = cls(folder, memory_limit, checkpoint=True)
        files = [store._file(i) for i in range(count)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: the checkpointed block inputs lack {missing[:3]}"
                                    "; restart with resume=False")
        store.count = count
        store.memory = None
        for i in range(count):
            store.nbytes += batch_bytes(store._load(i))
        if memory_limit is None or store.nbytes <= memory_limit:
            store.memory = [store._load(i) for i in range(count)]
        return store

    def remove(self) -> None:
        """Deletes the store's folder (its files) and drops the batches in memory."""
        self.memory = []
        self.count = self.nbytes = 0
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
