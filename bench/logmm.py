"""Log-domain matmul (qkern.logdomain.log_matmul, csrc/cpu/logmm) on each ISA, in one process:
the same codes, ISAs alternating, best of --repeats, 1 thread. 64 x 1024 activations (8-bit
codes) against 512 x 1024 weights (8-bit codes), every base 2^(1/2^f).

Run: PYTHONPATH=python python bench/logmm.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

import qkern
from qkern.logdomain import log_matmul, log_quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    before = qkern.get_num_threads()
    qkern.set_num_threads(1)
    isas = [i for i in ("scalar", "avx2", "avx512") if i in qkern.available_isas()]
    print("| base | " + " | ".join(f"{i} ms" for i in isas) + " | best vs avx2 |")
    print("|---|" + "--:|" * (len(isas) + 1))
    try:
        for f in range(7):
            base = 2.0 ** (1.0 / 2**f)
            xq = log_quantize(torch.randn(64, 1024), 8, base, per_row=True)
            wq = log_quantize(torch.randn(512, 1024), 8, base, per_row=True)
            best = {i: float("inf") for i in isas}
            for _ in range(args.repeats):
                for isa in isas:
                    qkern.set_isa(isa)
                    t0 = time.perf_counter()
                    log_matmul(xq, wq)
                    best[isa] = min(best[isa], time.perf_counter() - t0)
            ratio = best["avx2"] / min(best.values()) if "avx2" in best else float("nan")
            cells = " | ".join(f"{best[i] * 1e3:.1f}" for i in isas)
            print(f"| 2^(1/{2**f}) | {cells} | {ratio:.2f}x |")
    finally:
        qkern.set_isa("auto")
        qkern.set_num_threads(before)


if __name__ == "__main__":
    main()
