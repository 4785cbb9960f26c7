"""int4 g128 GEMV (M = 1) back to back, qkern's fast mode beside aten's
``_weight_int4pack_mm``, with enough copies that the weights really come from memory.

``qkern bench matmul --sweep`` builds copies of all fifteen implementations at once, so it
caps each one's copies at 512 MiB (and by memory); on a CPU with a larger last-level cache
(an Intel VM reporting 480 MiB) part of those weights stay cached. With two implementations
this script can afford copies spanning ``--span-mib`` (default: twice the last-level cache,
uncapped) each. The figure is time_sweeps' (the bench's sweep): per call, median of
``--repeats``, the two alternating, after a wake-up call.

    PYTHONPATH=python python bench/gemv_cold_sweep.py --shapes 4096x4096,11008x4096,4096x11008
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from qkern import set_num_threads
from qkern.tools.bench import peers
from qkern.tools.bench.matmul import _qkern
from qkern.tools.bench.sweep import copies_for, time_sweeps
from qkern.tools.bench.timing import Probe, l3_bytes, machine_line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="N x K, ...")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--span-mib", type=int, default=None)
    a = p.parse_args()
    set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    span = (a.span_mib << 20) if a.span_mib else 2 * l3_bytes()
    probe = Probe.make(256 << 20)
    print(machine_line(a.threads) + f"; copies span {span >> 20} MiB each", flush=True)
    print("\n| N x K | copies (aten / qkern) | aten int4 ms | qkern int4 fast ms | qkern vs aten "
          "| qkern GB/s |\n|---|--:|--:|--:|--:|--:|")
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        lin = nn.Linear(k, n)
        def q4(lin=lin):
            return _qkern(lin, fmt="int4", group_size=128, mode="fast")
        first, qbytes, _ = q4()
        # the timed copies span `span`, plus the wake-up one
        count = copies_for(qbytes, cache=span // 2, most=1 << 30)
        layers = {"aten": [peers.aten_int4(lin).fn for _ in range(count)],
                  "qkern": [first] + [q4()[0] for _ in range(count - 1)]}
        med = time_sweeps(layers, torch.randn(1, k), a.repeats, probe, 0.01)
        print(f"| {n}x{k} | {count} / {count} | {1e3 * med['aten']:.3f} | "
              f"{1e3 * med['qkern']:.3f} | {med['aten'] / med['qkern']:.2f}x | "
              f"{qbytes / med['qkern'] / 1e9:.1f} |", flush=True)
        del layers, first
    print(f"\nRead bandwidth in the same sweeps {probe.read_gbs():.1f} GB/s.")


if __name__ == "__main__":
    main()
