"""M = 1 as a decode step sees it: many layers of one shape called back to back.

The main ``qkern bench matmul`` table times every call alone: the caches are flushed (a read of
twice the last-level cache) and the cores left idle for ``--settle-ms`` first, so everything a
call touches is cold, including the interpreter's and torch's own code and data. A decode step
is different: each layer's weights come from memory, but the code that calls them runs every few
hundred microseconds and stays in cache. This table reproduces that: each implementation is
built ``copies`` times (enough copies that one sweep reads at least twice the last-level cache,
so no layer's weights are still cached when it is called again) and the sweep over all copies
is timed; the figure is the sweep's time divided by the copies. Implementations alternate as in
the main table, and the read-bandwidth probe runs between the sweeps.

Before each sweep the cores are left idle (``settle_s``, so that the previous implementation's
spinning threads stop), and then the last copy is called once, untimed: it wakes this
implementation's worker threads, as the previous layer of a decode step would have, and the
timed sweep runs over the other copies (whose weights the last sweep evicted). Without it the
first call of a sweep paid 0.3-0.5 ms of thread wake-up on this VM, which a sweep of 4 copies
(a 16 MB fp8 layer) spread as +0.1 ms per call.

The timed copies alone (the wake-up copy not counted) add up to twice the last-level cache, and
the timed sweep goes round them until it has made at least ``min_calls`` calls (24): a decode
step calls dozens of layers in a row, and the first calls after the idle pause run slow for
longer than the one wake-up call covers. With 3 timed calls (a 16 MB fp8 layer: 4 copies, one
round) every implementation measured 1.5-1.9 x slower per call than over 24 calls, which is
what the fp8 row's "49-51 % of the read probe" of the earlier tables was (docs/speed.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .timing import Probe, available_bytes, evict_bytes, l3_bytes, time_alternating, time_block


def copies_for(nbytes: int, cache: int | None = None, most: int = 512) -> int:
    """Copies of a layer: enough timed ones whose weights (``nbytes`` each) add up to twice the
    last-level cache (``cache``; by default timing.evict_bytes: twice the cache, at most
    512 MiB) (at least 2), plus the untimed wake-up copy; at most ``most`` (layers that small
    stay partly cached, as they would in a model)."""
    span = evict_bytes() if cache is None else 2 * cache
    return min(most, max(2, -(-span // max(nbytes, 1))) + 1)


def fit_memory(copies: dict[str, int], nbytes: dict[str, int], avail: int) -> dict[str, int]:
    """The copies scaled down (each to at least 3) so that all of them together hold at most
    half of ``avail`` bytes: every implementation's copies live at once, as they alternate."""
    total = sum(copies[n] * nbytes[n] for n in copies)
    if total <= avail // 2:
        return dict(copies)
    scale = (avail // 2) / total
    return {n: max(3, int(c * scale)) for n, c in copies.items()}


def rounds_for(copies: int, min_calls: int) -> int:
    """Rounds of a timed sweep over ``copies - 1`` copies that make at least ``min_calls``
    calls."""
    return max(1, -(-min_calls // max(copies - 1, 1)))


def time_sweeps(layers: dict[str, list[Callable]], x: torch.Tensor, repeats: int,
                probe: Probe | None = None, settle_s: float = 0.0,
                min_calls: int = 24,
                samples_out: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Median seconds per call of each implementation, its copies called back to back (the
    last copy untimed, first: the wake-up call; the others round and round until at least
    ``min_calls`` calls). ``samples_out``: as :func:`time_alternating`'s (seconds per call)."""
    def sweep(n: str) -> Callable[[], None]:
        def run() -> None:
            for f in layers[n][:-1]:
                f(x)
        return run

    rounds = {n: rounds_for(len(fs), min_calls) for n, fs in layers.items()}
    sweeps = {n: sweep(n) for n in layers}

    def sample(n: str) -> float:  # the last copy untimed: the wake-up call (see above)
        return time_block(sweeps[n], rounds[n], settle_s,
                          lambda: layers[n][-1](x)) / (len(layers[n]) - 1)

    with torch.no_grad():
        for fs in layers.values():  # warm-up: builds plans, touches every page once
            for f in fs:
                f(x)
        return time_alternating(sweeps, repeats, 0, probe, sample=sample,
                                samples_out=samples_out)[0]


def run_sweep(shapes, makers: Callable[[nn.Linear], dict[str, Callable[[nn.Linear], tuple]]],
              repeats: int, settle_s: float, probe: Probe, ref: str,
              most: int = 512, min_calls: int = 24) -> list[str]:
    """The table's lines: one row per (shape, implementation), ratios against ``ref``.
    ``makers(lin)``: name -> builder of (call on x, weight bytes per call, note) from ``lin``."""
    lines = ["", "**M = 1, layers back to back** (weights cold, code warm: a decode step; "
             "each implementation's copies swept, time per call)", "",
             f"| layer (N x K) | implementation | copies | ms | vs {ref.split(' (')[0]} | "
             "GB/s weights | % of read bw |", "|---|---|--:|--:|--:|--:|--:|"]
    rows = []
    for n, k in shapes:
        lin = nn.Linear(k, n)
        builds = makers(lin)
        first = {name: build(lin) for name, build in builds.items()}
        nbytes = {name: f[1] for name, f in first.items()}
        want = {name: copies_for(nb, most=most) for name, nb in nbytes.items()}
        copies = fit_memory(want, nbytes, available_bytes())
        if copies != want:
            print(f"  {n}x{k}: fewer copies than the cache asks for, to fit in memory "
                  f"(half of MemAvailable): {sum(copies.values())} of {sum(want.values())}",
                  flush=True)
        layers = {name: [first[name][0]] + [builds[name](lin)[0] for _ in range(c - 1)]
                  for name, c in copies.items()}
        med = time_sweeps(layers, torch.randn(1, k), repeats, probe, settle_s, min_calls)
        print(f"  {n}x{k} M=1 back to back: " + ", ".join(
            f"{a} {1e3 * t:.3f} ms" for a, t in med.items()), flush=True)
        rows.append((n, k, med, copies, nbytes))
        del layers, first  # one shape's copies at a time
    short = sorted({name for _, _, _, copies, nbytes in rows for name in copies
                    if (copies[name] - 1) * nbytes[name] < 2 * l3_bytes()})
    if short:
        lines.insert(2, f"Not cold for every row: the timed copies of {len(short)} "
                        f"implementation(s) span less than twice the {l3_bytes() >> 20} MiB "
                        "last-level cache (the copies are capped at 512 MiB and by memory), so "
                        "part of their weights can still be cached when called again; a row "
                        "above 100 % of the read bandwidth shows it.")
    read_gbs = probe.read_gbs()
    for n, k, med, copies, nbytes in rows:
        for name, t in med.items():
            gbs = nbytes[name] / t / 1e9
            vs = f"{med[ref] / t:.2f}x" if ref in med else "-"
            lines.append(f"| {n}x{k} | {name} | {copies[name]} | {1e3 * t:.3f} | {vs} | "
                         f"{gbs:.1f} | {100 * gbs / read_gbs:.0f} % |")
    lines.insert(2, f"Read bandwidth in the same sweeps {read_gbs:.1f} GB/s.")
    return lines
