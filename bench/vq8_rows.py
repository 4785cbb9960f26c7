"""The VQ int8 fast mode (``gemm_vq8``) at 1-3 rows of x, beside torch's fp32 ``x @ W.T``, on
a chosen ISA level (docs/speed.md, fourteenth pass: the AVX2 path that looks codes up in
per-call dot tables). Random codes and a random 256-entry codebook per layer (128 at dim 8),
speed only. Best of ``--repeats`` calls after three warm-ups, ms. For a before / after, run it
once per build (``PYTHONPATH`` pointing at each).

    PYTHONPATH=python python bench/vq8_rows.py --isa avx2 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

import qkern
from qkern.ops.vq8 import pack_codes4, quantize_codebooks, run_gemm_vq8, vq8_tables


def best_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isa", default="avx2", help="qkern ISA level (default avx2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="NxK,...")
    ap.add_argument("--dims", default="4,2")
    ap.add_argument("--rows", default="1,3", help="rows of x (M)")
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    qkern.set_isa(a.isa)
    qkern.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    print(f"ISA {qkern.get_isa()}, {a.threads} threads; best of {a.repeats}, ms")
    print("| N x K | dim | M | gemm_vq8 | fp32 x @ W.T |\n|---|--:|--:|--:|--:|")
    for shape in a.shapes.split(","):
        n, k = (int(s) for s in shape.split("x"))
        w = torch.randn(n, k, generator=g)
        for dim in (int(d) for d in a.dims.split(",")):
            kc = 128 if dim == 8 else 256
            codes = torch.randint(0, kc, (n, k // dim), generator=g).to(torch.uint8)
            books8, bs = quantize_codebooks(torch.randn(1, kc, dim, generator=g))
            packed, tables = pack_codes4(codes), vq8_tables(books8)
            for m in (int(r) for r in a.rows.split(",")):
                x = torch.randn(m, k, generator=g)
                vq = best_ms(lambda: run_gemm_vq8(x, packed, books8, bs, None, None, n, k, n,
                                                  tables), a.repeats)
                fp = best_ms(lambda: x @ w.T, a.repeats)
                print(f"| {n} x {k} | {dim} | {m} | {vq:.2f} | {fp:.2f} |", flush=True)


if __name__ == "__main__":
    main()
