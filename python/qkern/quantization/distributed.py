"""Data- and layer-parallel calibration over ``torch.distributed`` (docs/distributed.md).

The block-by-block pipeline (:func:`~qkern.quantization.sequential.quantize_sequential`) runs
on every rank of an initialized process group (torchrun: gloo on CPUs, NCCL on GPUs):

- each rank takes its shard of the calibration batches (:func:`shard`: ``batches[rank::world]``)
  and runs every block on it; the next block's inputs are the block's outputs on that shard
  (nothing is gathered);
- the statistics are sums over tokens, all-reduced where they are accumulated: Gram matrices
  ``X^T X`` and the token count N (:func:`~qkern.quantization.calibration.collect_grams`),
  SmoothQuant's per-channel ``max |x|`` (MAX) and Gram sums, :func:`sync_observers` for
  min/max observers (MIN / MAX); small per-batch statistics (AWQ's mean |x| and search
  losses, LKD's losses) are summed over all ranks' batches in the calibration list's order
  (:func:`sum_batches`: bit for bit one process's sum);
- layer-parallel GPTQ: the linears of one true-sequential group are quantized round robin on
  the ranks (:func:`owner`); each owner broadcasts its quantized module (:func:`share_modules`)
  so every rank ends with identical modules.

Inside the pipeline the group is *active* (:func:`data_parallel`); outside it the helpers are
no-ops, so a plain single-process run is unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..observers import MinMaxObserver, MovingAverageMinMaxObserver, Observer

__all__ = ["DataParallel", "active", "all_batches", "all_reduce_max", "all_reduce_min",
           "all_reduce_sum", "batch_count", "batch_indices", "data_parallel", "local_batch", "mine",
           "owner", "resolve", "shard", "share_modules", "sum_batches", "sync_observers"]


class DataParallel:
    """A process group the pipeline runs over: ``rank`` of ``world`` (``group`` None: the
    default group)."""

    def __init__(self, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs an initialized torch.distributed process "
                             "group: launch with torchrun (or call "
                             "torch.distributed.init_process_group) first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world={self.world})"


_ACTIVE: contextvars.ContextVar[DataParallel | None] = contextvars.ContextVar(
    "qkern_data_parallel", default=None)


def resolve(distributed: bool | None) -> DataParallel | None:
    """The group a call runs over: ``distributed`` True (required), False (none), or None
    (automatic: the default group when one is initialized with more than one rank)."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
    if distributed is False:
        return None
    if distributed is None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
    return DataParallel()


def active() -> DataParallel | None:
    """The group of the running pipeline (None outside :func:`data_parallel`)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def data_parallel(dp: DataParallel | None) -> Iterator[DataParallel | None]:
    """Makes ``dp`` the active group inside the ``with`` body (None: single process)."""
    token = _ACTIVE.set(dp)
    try:
        yield dp
    finally:
        _ACTIVE.reset(token)


def shard(batches: Sequence, dp: DataParallel | None = None) -> list:
    """This rank's calibration batches: ``batches[rank::world]`` (all of them without a
    group). Every rank needs at least one batch."""
    dp = dp or active()
    if dp is None or dp.world == 1:
        return list(batches)
    if len(batches) < dp.world:
        raise ValueError(f"{len(batches)} calibration batch(es) for {dp.world} ranks: every "
                         "rank needs at least one batch (pass more batches or fewer ranks)")
    return list(batches[dp.rank::dp.world])


def _reduce(t: torch.Tensor, op) -> torch.Tensor:
    dp = active()
    if dp is None or dp.world == 1:
        return t
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"all-reduce needs a tensor, got {type(t).__name__}")
    t = t.contiguous()
    dev = _device(dp)
    buf = t.to(dev) if t.device != dev else t
    dist.all_reduce(buf, op=op, group=dp.group)
    return buf.to(t.device) if buf is not t else buf


def _device(dp: DataParallel) -> torch.device:
    """Where collectives run: CUDA for NCCL, the CPU otherwise."""
    if dist.get_backend(dp.group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the active group's ranks (``t`` itself outside one)."""
    return _reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """The element-wise max of ``t`` over the ranks."""
    return _reduce(t, dist.ReduceOp.MAX)


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """The element-wise min of ``t`` over the ranks."""
    return _reduce(t, dist.ReduceOp.MIN)


def batch_indices(n_local: int) -> list[int]:
    """The positions in the full calibration list of this rank's ``n_local`` batches
    (:func:`shard` took ``batches[rank::world]``); ``0 .. n_local - 1`` alone."""
    dp = active()
    if dp is None or dp.world == 1:
        return list(range(n_local))
    return [dp.rank + j * dp.world for j in range(n_local)]


def batch_count(n_local: int) -> int:
    """How many calibration batches all ranks hold together (``n_local`` alone)."""
    return int(all_reduce_sum(torch.tensor([n_local], dtype=torch.int64))[0])


def local_batch(index: int) -> int | None:
    """This rank's position of batch ``index`` of the full calibration list (None: another
    rank holds it); ``index`` alone."""
    dp = active()
    if dp is None or dp.world == 1:
        return index
    return index // dp.world if index % dp.world == dp.rank else None


def all_batches(rows: torch.Tensor) -> torch.Tensor:
    """(B, ...) one row per batch of this rank's shard -> (B_all, ...) every rank's rows, in
    the order of the full calibration list, on every rank. Exact: each rank writes its rows
    into zeros and the zero-padded tensors are summed (``x + 0 == x``)."""
    dp = active()
    if dp is None or dp.world == 1:
        return rows
    n = batch_count(rows.shape[0])
    buf = rows.new_zeros((n, *rows.shape[1:]))
    buf[batch_indices(rows.shape[0])] = rows
    return all_reduce_sum(buf)


def sum_batches(rows: torch.Tensor) -> torch.Tensor:
    """The sum over all ranks' batches of per-batch rows (B, ...), added batch after batch in
    the order of the full calibration list: bit for bit what one process adding its batches
    in turn computes (for small statistics; large ones are all-reduced as sums)."""
    rows = all_batches(rows)
    if rows.shape[0] == 0:
        raise ValueError("no calibration batch to sum over")
    acc = rows[0].clone()
    for r in rows[1:]:
        acc = acc + r
    return acc


def owner(index: int) -> int:
    """The rank that quantizes the ``index``-th layer of a group (round robin; 0 alone)."""
    dp = active()
    return 0 if dp is None else index % dp.world


def mine(index: int) -> bool:
    """Whether this rank quantizes the ``index``-th layer of a group (always, alone)."""
    dp = active()
    return dp is None or owner(index) == dp.rank


def share_modules(made: dict[str, object], names: Sequence[str]) -> dict[str, object]:
    """{name: object} for every name in ``names``: each rank passes the objects it made
    (those it owns, :func:`owner`) and gets every owner's (pickled and broadcast from it), so
    all ranks hold equal modules."""
    dp = active()
    if dp is None or dp.world == 1:
        return made
    out = {}
    for i, n in enumerate(names):
        src = owner(i)
        box = [made.get(n) if src == dp.rank else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(dp.group, src)
                                   if dp.group is not None else src, group=dp.group)
        out[n] = box[0]
    return out


def sync_observers(model: nn.Module, dp: DataParallel | None = None) -> int:
    """All-reduces the running min / max of every :class:`~qkern.observers.MinMaxObserver`
    in ``model`` (MIN / MAX: exactly the range of all ranks' data) after each rank calibrated
    on its shard; returns how many were synced. A moving-average or histogram observer is a
    ValueError (its statistics do not combine exactly)."""
    dp = dp or active() or resolve(True)
    token = _ACTIVE.set(dp)
    try:
        n = 0
        for name, m in model.named_modules():
            if not isinstance(m, Observer):
                continue
            if isinstance(m, MovingAverageMinMaxObserver) or not isinstance(m, MinMaxObserver):
                raise ValueError(f"{name}: {type(m).__name__} statistics do not combine "
                                 "across ranks; use MinMaxObserver for distributed calibration")
            if m.min_val.numel() == 0:
                raise ValueError(f"{name}: the observer saw no data on rank {dp.rank}")
            m.min_val = all_reduce_min(m.min_val.clone())
            m.max_val = all_reduce_max(m.max_val.clone())
            m.num_batches = all_reduce_sum(m.num_batches.clone())
            m._cached = None  # the qparams cache of the rank's own range
            n += 1
        return n
    finally:
        _ACTIVE.reset(token)
