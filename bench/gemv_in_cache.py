"""qkern's int4 / int3 / int2 fast GEMVs (M = 1) with their weights in the cache: the compute
each format costs per call once nothing is waited for (docs/speed.md "Sixth pass").

One layer per format, called back to back for ``--seconds`` after 50 warm-up calls (a 4096 x
4096 layer's 5-9 MB stay in a 32 MiB last-level cache), through the planned ``QuantLinear``
path the matmul bench times; microseconds per call and the weight bytes per call.

    PYTHONPATH=python python bench/gemv_in_cache.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import qkern
from qkern.tools.bench.matmul import QKERN_ROWS, _qkern
from qkern.tools.bench.timing import machine_line

ROWS = ("qkern int4 g128 fast", "qkern int3 g128 fast", "qkern int2 g128 fast")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default="1024x2048,4096x4096", help="N x K, comma-separated")
    p.add_argument("--seconds", type=float, default=0.5)
    a = p.parse_args()
    qkern.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    kw = dict(QKERN_ROWS)
    print(machine_line(a.threads))
    print("\n| layer | implementation | us per call | MB per call | GB/s |\n|---|---|--:|--:|--:|")
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        lin, x = nn.Linear(k, n), torch.randn(1, k)
        for name in ROWS:
            ql, nbytes, _ = _qkern(lin, **kw[name])
            with torch.no_grad():
                for _ in range(50):
                    ql(x)
                calls, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < a.seconds:
                    for _ in range(20):
                        ql(x)
                    calls += 20
                dt = (time.perf_counter() - t0) / calls
            print(f"| {n}x{k} | {name} | {dt * 1e6:.1f} | {nbytes / 1e6:.2f} | "
                  f"{nbytes / dt / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
