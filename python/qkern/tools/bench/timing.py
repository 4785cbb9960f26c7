"""Timing for the benchmarks: alternating medians, cache flushing, bandwidth probes and the
machine line printed on top of every table (the method is described in
:mod:`qkern.tools.bench.core`)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import qkern

__all__ = ["Flusher", "Probe", "available_bytes", "cpu_model", "evict_bytes", "l3_bytes",
           "machine_line", "rss_bytes", "time_alternating", "time_block"]


@dataclass
class Probe:
    """The bandwidth probes run between the rows (samples pooled over the whole run)."""

    src: torch.Tensor
    dst: torch.Tensor
    copy_s: list[float] = field(default_factory=list)
    sum_s: list[float] = field(default_factory=list)

    @classmethod
    def make(cls, nbytes: int) -> Probe:
        src = torch.rand(nbytes // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)  # touch every page before timing
        return cls(src, dst)

    @property
    def nbytes(self) -> int:
        return self.src.numel() * 4

    def run_copy(self) -> None:
        self.dst.copy_(self.src)

    def run_sum(self) -> None:
        self.src.sum()

    def copy_gbs(self) -> float:
        return 2 * self.nbytes / statistics.median(self.copy_s) / 1e9

    def read_gbs(self) -> float:
        return self.nbytes / statistics.median(self.sum_s) / 1e9


def _timed(fn: Callable[[], object], flush: Callable[[], object] | None = None) -> float:
    if flush is not None:
        flush()
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    del out  # freeing the result is not part of the operation
    return t1 - t0


def l3_bytes() -> int:
    """Size of the last-level cache (32 MiB when it cannot be read)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(f"{base}/{d}/size") as f:
                    txt = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:].upper(), 1)
            best = max(best, int(txt.rstrip("KMGkmg")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


def evict_bytes() -> int:
    """Bytes a read must cover to evict the caches: twice the last-level cache, at most
    512 MiB (a CPU reporting a 480 MiB L3 would otherwise ask for a gigabyte per flush, and
    the sweep for a gigabyte of copies of every implementation)."""
    return min(2 * l3_bytes(), 512 << 20)


def rss_bytes() -> int:
    """This process's resident bytes now (/proc/self/statm; Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (8 GiB when it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 << 30


class Flusher:
    """Runs before every timed call: evicts the caches by reading (not writing, so nothing
    dirty is left to write back) a buffer of twice the last-level cache, then sleeps
    ``settle_s`` so that threads still spinning from the previous parallel region (torch's
    OpenMP workers spin for milliseconds after each region) do not take cores from the next
    call. Every call starts cold and on idle cores."""

    def __init__(self, settle_s: float = 0.0) -> None:
        self.buf = torch.ones(evict_bytes() // 4)
        self.settle_s = settle_s

    def __call__(self) -> None:
        self.buf.sum()
        if self.settle_s > 0:
            time.sleep(self.settle_s)


def time_block(call: Callable[[], object], calls: int, settle_s: float = 0.0,
               wake: Callable[[], object] | None = None) -> float:
    """Seconds per call of ``calls`` back-to-back calls, as a decode step or a batch of encodes
    sees them: first ``settle_s`` idle (the previous sample's spinning threads stop and leave
    the cores), then one untimed ``wake`` call (it wakes this implementation's worker threads,
    as the previous layer or batch would have)."""
    if settle_s > 0:
        time.sleep(settle_s)
    if wake is not None:
        wake()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - t0) / calls


def time_alternating(impls: dict[str, Callable[[], object]], repeats: int, warmup: int,
                     probe: Probe | None = None, flush: Callable[[], object] | None = None,
                     budget_s: float | None = None,
                     sample: Callable[[str], float] | None = None,
                     samples_out: dict[str, list[float]] | None = None,
                     ) -> tuple[dict[str, float], int]:
    """Median seconds of each implementation, timed in alternating order, and the number of
    repeats used: at least 3, fewer than ``repeats`` when one round of the slowest
    implementations would overrun ``budget_s``. ``sample(name)``: one sample of an
    implementation (default: one call, ``flush`` before it; :func:`time_block` for blocks).
    ``samples_out``, if given, receives every implementation's samples, round by round (for
    ratios paired within a round)."""
    names = list(impls)
    last: dict[str, float] = {}
    for _ in range(warmup):
        for n in names:
            last[n] = _timed(impls[n], flush)
    if budget_s is not None and last:
        per_round = sum(last.values())
        repeats = max(min(repeats, 3), min(repeats, int(budget_s / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names) if names else 0
        order = names[k:] + names[:k]  # cyclic: each implementation follows each other one
        for n in order:
            samples[n].append(sample(n) if sample else _timed(impls[n], flush))
        if probe is not None:
            probe.copy_s.append(_timed(probe.run_copy, flush))
            probe.sum_s.append(_timed(probe.run_sum, flush))
    if samples_out is not None:
        samples_out.update(samples)
    return {n: statistics.median(s) for n, s in samples.items()}, repeats


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(threads: int) -> str:
    return (f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); threads: {threads} "
            f"(torch {torch.get_num_threads()}, qkern {qkern.get_num_threads()}); qkern ISA: "
            f"{qkern.get_isa()}; torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}, THP_MEM_ALLOC_ENABLE="
            f"{os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}); Python "
            f"{platform.python_version()}; load average {_loadavg()}")


def _loadavg() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"
