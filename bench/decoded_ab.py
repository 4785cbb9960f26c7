"""A/B of the many-row paths of the float-activation kernels (docs/speed.md, thirteenth pass):
each layer's fused kernel against its weight decoded by chunks for ``torch.mm``
(``qkern.ops.decoded``), beside torch's fp32 ``F.linear``, on the active ISA.

- nf4 / fp8: one ``QuantLinear`` called with the decoded-path thresholds
  (``qkern.ops.lut4.DECODED_MIN_ROWS``, ``qkern.ops.fp8.DECODED_MIN_ROWS``) forced to 1 and to
  10^9 in turn;
- VQ exact (d4, a 256-entry codebook per layer): ``VQLinear``'s forward (decoded by chunks)
  against the whole weight decoded into a fresh tensor and ``F.linear`` (the path before).

Best of ``--repeats`` calls after one warm-up, ms.

    PYTHONPATH=python python bench/decoded_ab.py --threads 2 --shapes 2048x2048,4096x4096
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

import qkern
from qkern.nn import QuantLinear
from qkern.ops import fp8 as fp8_ops
from qkern.ops import lut4 as lut4_ops
from qkern.vq.linear import VQLinear


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def forced(table: dict, value, fn, repeats: int) -> float:
    saved = dict(table)
    try:
        table.update({k: value for k in table})
        return best_ms(fn, repeats)
    finally:
        table.update(saved)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="2048x2048,4096x4096", help="NxK,...")
    ap.add_argument("--ms", default="64,256,512", help="rows of x")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    qkern.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    print(f"ISA {qkern.get_isa()}, {a.threads} threads, best of {a.repeats}, ms")
    print("| N x K | M | fp32 | nf4 fused | nf4 decoded | fp8 fused | fp8 decoded | "
          "VQ d4 whole + F.linear | VQ d4 by chunks |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        lin = torch.nn.Linear(k, n, bias=False)
        w = lin.weight.detach()
        nf4 = QuantLinear.from_float(lin, "nf4", group_size=64)
        fp8 = QuantLinear.from_float(lin, "fp8_e4m3", group_size=None)
        codes = torch.randint(0, 256, (n, k // 4), dtype=torch.uint8)
        vq = VQLinear(codes, torch.randn(1, 256, 4), None, None, group_rows=n)

        def vq_whole(x):
            dec = torch.ops.qkern.dequantize_vq(vq._vq_packed, vq._vq_books, None, n, k, n)
            return F.linear(x, dec)

        for m in (int(v) for v in a.ms.split(",")):
            x = torch.randn(m, k)
            with torch.no_grad():
                row = [best_ms(lambda: F.linear(x, w), a.repeats)]
                for layer, table in ((nf4, lut4_ops.DECODED_MIN_ROWS),
                                     (fp8, fp8_ops.DECODED_MIN_ROWS)):
                    row.append(forced(table, 10**9, lambda: layer(x), a.repeats))
                    row.append(forced(table, 1, lambda: layer(x), a.repeats))
                row.append(best_ms(lambda: vq_whole(x), a.repeats))
                row.append(best_ms(lambda: vq(x), a.repeats))
            print(f"| {shape} | {m} | " + " | ".join(f"{v:.1f}" for v in row) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
