"""What one cold call costs beyond its weights: int4 g128 fast GEMVs (M = 1, K = 4096) of
growing N, each timed cold (the bench's Flusher: a read of twice the last-level cache, at most
512 MiB, then ``--settle-ms`` idle) and hot (called back to back), beside torch's fp32
F.linear. The cold time of the smallest layer, whose weights are a fraction of a megabyte, is
what a call costs when the interpreter's, torch's and qkern's code and data all come from
memory: the intercept that ``qkern bench matmul``'s cold table adds to every row.

    PYTHONPATH=python python bench/cold_call_cost.py --threads 2,1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from qkern import set_num_threads
from qkern.tools.bench.matmul import _qkern
from qkern.tools.bench.timing import Flusher, machine_line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="2,1")
    p.add_argument("--rows", default="256,1024,4096,11008")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--settle-ms", type=float, default=10.0)
    a = p.parse_args()
    torch.manual_seed(0)
    flush = Flusher(a.settle_ms / 1e3)
    print(machine_line(int(a.threads.split(",")[0])), flush=True)
    print("\n| threads | N x 4096 | int4 MB | int4 cold ms | int4 hot ms | fp32 cold ms | "
          "fp32 hot ms |\n|--:|---|--:|--:|--:|--:|--:|")
    for th in (int(t) for t in a.threads.split(",")):
        set_num_threads(th)
        torch.set_num_threads(th)
        for n in (int(r) for r in a.rows.split(",")):
            lin = nn.Linear(4096, n, bias=False)
            q4, nbytes, _ = _qkern(lin, fmt="int4", group_size=128, mode="fast")
            x = torch.randn(1, 4096)
            cells = []
            for f in (q4, lambda x, w=lin.weight: nn.functional.linear(x, w)):
                with torch.no_grad():
                    f(x)
                    cold, hot = [], []
                    for _ in range(a.repeats):
                        flush()
                        t0 = time.perf_counter()
                        f(x)
                        cold.append(time.perf_counter() - t0)
                    for _ in range(a.repeats):
                        t0 = time.perf_counter()
                        f(x)
                        hot.append(time.perf_counter() - t0)
                cells += [1e3 * statistics.median(cold), 1e3 * statistics.median(hot)]
            print(f"| {th} | {n} x 4096 | {nbytes / 1e6:.2f} | " +
                  " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
