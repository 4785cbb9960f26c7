"""AdditiveQuantizer encoding (beam start + 16 ILS rounds of 4 ICM sweeps, 4 perturbations) on
minilm-like data: 2200 x 384 float32 (Gaussian with a decaying spectrum), m = 8 codebooks of
K = 256 (trained as a residual quantizer, 5 k-means iterations), in one process:

- "search": ICM by nearest-centroid searches of the residuals (qkern.vq.icm's path for
  codebooks past qkern.vq.search.LUT_MAX_FLOATS, the implementation before the look-up tables;
  forced here by setting the limit to 0);
- "lut": the C++ look-up-table ICM / ILS (unary + pairwise terms).

Median of ``--repeats`` runs each, after one warm-up of each; MSE of both codes.

    PYTHONPATH=python python bench/icm_lut.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import qkern
from qkern.vq import AdditiveQuantizer, ResidualQuantizer, search
from qkern.vq.icm import sq_errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=2200)
    a = ap.parse_args()
    qkern.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    d, m = 384, 8
    x = (rng.standard_normal((a.n, d)) * np.geomspace(1.0, 0.05, d)).astype(np.float32)
    rq = ResidualQuantizer(d, m, 8, n_iter=5).train(x)
    aq = AdditiveQuantizer(d, m, 8)
    aq.codebooks, aq.is_trained = rq.codebooks, True
    limit = search.LUT_MAX_FLOATS
    times: dict[str, list[float]] = {"search": [], "lut": []}
    codes = {}
    for rep in range(a.repeats + 1):  # the first of each: a warm-up
        for name, lim in (("search", 0), ("lut", limit)):
            search.LUT_MAX_FLOATS = lim
            aq._cross = None
            t0 = time.perf_counter()
            codes[name] = aq.encode(x)
            if rep:
                times[name].append(time.perf_counter() - t0)
    search.LUT_MAX_FLOATS = limit
    print(f"n = {a.n}, d = {d}, m = {m}, K = 256, 16 ILS rounds, threads = {a.threads}, "
          f"ISA {qkern.get_isa()}")
    for name, ts in times.items():
        mse = float(sq_errors(x, aq.codebooks, codes[name]).mean())
        print(f"{name:7s} encode median {statistics.median(ts):8.3f} s "
              f"({', '.join(f'{t:.3f}' for t in ts)})  MSE {mse:.6f}")
    print("codes equal:", bool((codes["search"] == codes["lut"]).all()),
          f"rows differing: {int((codes['search'] != codes['lut']).any(1).sum())}")


if __name__ == "__main__":
    main()
