"""g128 GEMV (M = 1) back to back, qkern's fast mode (int4, and int3 / int2 with
``--bits 4,3,2``) beside aten's int4 ``_weight_int4pack_mm``, with enough copies that the
weights really come from memory.

``qkern bench matmul --sweep`` builds copies of all fifteen implementations at once, so it
caps each one's copies at 512 MiB (and by memory); on a CPU with a larger last-level cache
(an Intel VM reporting 480 MiB) part of those weights stay cached. With at most four
implementations this script can afford copies spanning ``--span-mib`` (default: twice the
last-level cache, uncapped) each. The figure is time_sweeps' (the bench's sweep): per call,
median of ``--repeats``, the implementations alternating, after a wake-up call. The ratios are
paired: the median over rounds of the two implementations' ratio within a round (this VM's
bandwidth drifts by 10-20 % between rounds; within a round it mostly cancels), with the middle
half of the rounds' ratios in brackets. With several widths, each is also given as a speed-up
over qkern's int4 beside the ratio of their bytes (codes + scales): the issue's "faster than
int4 in proportion to their bytes".

    PYTHONPATH=python python bench/gemv_cold_sweep.py --shapes 4096x4096,11008x4096,4096x11008
    PYTHONPATH=python python bench/gemv_cold_sweep.py --bits 4,3,2
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from qkern import set_num_threads
from qkern.tools.bench import peers
from qkern.tools.bench.matmul import _qkern
from qkern.tools.bench.sweep import copies_for, time_sweeps
from qkern.tools.bench.timing import Probe, available_bytes, l3_bytes, machine_line, rss_bytes


def _copies(make, count: int, rss0: int, limit: int) -> list:
    """Up to ``count`` results of ``make()``, at least 3, fewer once this process has grown by
    ``limit`` bytes since ``rss0``."""
    out = []
    while len(out) < count and (len(out) < 3 or rss_bytes() - rss0 < limit):
        out.append(make())
    return out


def paired(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """The median and quartiles of num[r] / den[r] over the rounds r."""
    r = sorted(a / b for a, b in zip(num, den))
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return statistics.median(r), q[0], q[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="N x K, ...")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--span-mib", type=int, default=None)
    p.add_argument("--bits", default="4", help="qkern code widths, comma list of 4, 3, 2")
    a = p.parse_args()
    bits = [int(b) for b in a.bits.split(",")]
    if not bits or any(b not in (2, 3, 4) for b in bits):
        p.error(f"--bits: a comma list of 4, 3, 2, got {a.bits!r}")
    set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    span = (a.span_mib << 20) if a.span_mib else 2 * l3_bytes()
    probe = Probe.make(256 << 20)
    print(machine_line(a.threads) + f"; copies span {span >> 20} MiB each", flush=True)
    print("\n| N x K | implementation | copies | ms | vs aten int4 | GB/s | vs qkern int4 "
          "| int4's bytes / its bytes |\n|---|---|--:|--:|--:|--:|--:|--:|")
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        lin = nn.Linear(k, n)
        # each implementation's copies span `span`, plus the wake-up one; building stops once
        # the process has grown by its share of half of MemAvailable (a line says so): a copy
        # can hold more than its weights (the allocators' pools, the builders' temporaries)
        budget, rss0 = available_bytes() // 2, rss_bytes()
        nbytes = {b: _qkern(lin, fmt=f"int{b}", group_size=128, mode="fast")[1] for b in bits}
        want = {f"int{b}": copies_for(nbytes[b], cache=span // 2, most=1 << 30) for b in bits}
        want["aten"] = copies_for(n * k // 2, cache=span // 2, most=1 << 30)  # 4-bit codes
        makers = {f"int{b}": (lambda b=b: _qkern(lin, fmt=f"int{b}", group_size=128,
                                                 mode="fast")[0]) for b in bits}
        makers["aten"] = lambda: peers.aten_int4(lin).fn
        layers = {}
        for i, name in enumerate(makers):
            layers[name] = _copies(makers[name], want[name], rss0, budget * (i + 1) // len(want))
            if len(layers[name]) < want[name]:
                print(f"  {n}x{k} {name}: {len(layers[name])} of {want[name]} copies, to fit "
                      "in memory")
        smp: dict[str, list[float]] = {}
        med = time_sweeps(layers, torch.randn(1, k), a.repeats, probe, 0.01, samples_out=smp)
        print(f"| {n}x{k} | aten int4 g128 bf16 | {len(layers['aten'])} | "
              f"{1e3 * med['aten']:.3f} | 1.00x | | | |")
        for b in bits:
            t, s = med[f"int{b}"], smp[f"int{b}"]
            rel = " | "
            if 4 in bits:
                m, lo, hi = paired(smp["int4"], s)
                rel = f"{m:.2f}x ({lo:.2f}-{hi:.2f}) | {nbytes[4] / nbytes[b]:.2f}x"
            print(f"| {n}x{k} | qkern int{b} g128 fast | {len(layers[f'int{b}'])} | "
                  f"{1e3 * t:.3f} | {paired(smp['aten'], s)[0]:.2f}x | "
                  f"{nbytes[b] / t / 1e9:.1f} | {rel} |", flush=True)
        del layers
    print(f"\nRead bandwidth in the same sweeps {probe.read_gbs():.1f} GB/s.")


if __name__ == "__main__":
    main()
