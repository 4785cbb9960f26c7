"""Fast Walsh-Hadamard transform: qkern's kernel (qkern.hadamard.fwht) beside a dense torch
matmul by H_n / sqrt(n) and a torch butterfly (log2 n reshapes of add/sub), all float32, in the
same run, n = 1024 .. 16384, rows 1 and 512. Also each qkern ISA at rows 512.

    PYTHONPATH=python python bench/fwht.py [--threads 2] [--dense-max 16384]
"""

from __future__ import annotations

import argparse
import math

import torch

import qkern
from qkern.hadamard import fwht, hadamard_matrix
from qkern.tools.bench.timing import machine_line, time_alternating


def butterfly(x: torch.Tensor) -> torch.Tensor:
    """x H_n / sqrt(n) with torch ops: stage h pairs x[j] and x[j + h] (j mod 2h < h)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        v = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x / math.sqrt(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dense-max", type=int, default=16384,
                    help="largest n timed with the dense matmul (its matrix is 4 n^2 bytes)")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    qkern.set_num_threads(args.threads)
    print(machine_line(args.threads))
    print("median time per call (microseconds); 'x' = dense or butterfly time / qkern time\n")
    head = (f"{'n':>6} {'rows':>5} | {'qkern fwht':>11} | {'dense matmul':>13} {'x':>6} | "
            f"{'torch butterfly':>15} {'x':>6} | max |diff| vs dense")
    print(head)
    print("-" * len(head))
    for rows in (1, 512):
        for n in (1024, 2048, 4096, 8192, 16384):
            x = torch.randn(rows, n)
            impls = {"qkern": lambda x=x: fwht(x), "butterfly": lambda x=x: butterfly(x)}
            h = None
            if n <= args.dense_max:
                h = (hadamard_matrix(n) / math.sqrt(n)).float()
                impls["dense"] = lambda x=x, h=h: x @ h
            budget = 2.0 if rows == 1 else 6.0
            t, _ = time_alternating(impls, args.repeats, warmup=2, budget_s=budget)
            us = {k: v * 1e6 for k, v in t.items()}
            diff = "" if h is None else f"{(fwht(x) - x @ h).abs().max().item():.1e}"
            dense = (f"{us['dense']:13.1f} {us['dense'] / us['qkern']:6.1f}" if h is not None
                     else f"{'-':>13} {'-':>6}")
            print(f"{n:>6} {rows:>5} | {us['qkern']:11.1f} | {dense} | "
                  f"{us['butterfly']:15.1f} {us['butterfly'] / us['qkern']:6.1f} | {diff}")
            del h
    print("\nqkern fwht per ISA, rows 512 (microseconds)")
    isas = ["scalar"] + (["avx2"] if qkern._C.cpu_has_avx2() else []) + (
        ["avx512"] if qkern._C.cpu_has_avx512() else [])
    print(f"{'n':>6} | " + " | ".join(f"{i:>9}" for i in isas))
    before = qkern.get_isa()
    for n in (1024, 4096, 16384):
        x = torch.randn(512, n)
        cols = []
        for isa in isas:
            qkern.set_isa(isa)
            t, _ = time_alternating({isa: lambda x=x: fwht(x)}, args.repeats, warmup=2,
                                    budget_s=3.0)
            cols.append(f"{t[isa] * 1e6:9.1f}")
        print(f"{n:>6} | " + " | ".join(cols))
    qkern.set_isa(before)


if __name__ == "__main__":
    main()
