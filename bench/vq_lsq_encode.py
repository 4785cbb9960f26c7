"""LSQ encoding speed: qkern's bench maker beside FAISS's ``LSQ{m}x8`` index, in one process.

``qkern bench vq`` trains FAISS's LSQ for up to 13 minutes a row (digits at 32 bytes), and its
LSQ encode seconds were single runs. This script times the two encoders alternating (median of
``--repeats``), each on codebooks it trained: qkern's LSQ maker in full, FAISS's index with
``--faiss-train-iters`` training rounds (its default is 25). FAISS's encoder does a fixed
amount of work whatever its codebooks (random codes, then ``encode_ils_iters`` = 16 rounds of
perturbation and ``icm_iters`` ICM sweeps), so a shorter training leaves its encode seconds as
they are and only its MSE worse: the MSE columns are printed for the record, the bench's
tables hold the fully trained ones. qkern's encoder starts from a beam search (5) and runs 16
ILS rounds of 4 ICM sweeps, stopping a round's sweeps early when one changes nothing.

    PYTHONPATH=python python bench/vq_lsq_encode.py --datasets digits,minilm --bytes 8,16,32
"""

from __future__ import annotations

import argparse
import time

from qkern import set_num_threads
from qkern.tools.bench import vq, vq_data
from qkern.tools.bench.timing import machine_line, time_alternating


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="digits,minilm")
    p.add_argument("--bytes", default="8,16,32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--faiss-train-iters", type=int, default=2,
                   help="FAISS LSQ training rounds (its default: 25)")
    a = p.parse_args()
    faiss = vq._import_faiss()
    set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    print(machine_line(a.threads) + f"; faiss {faiss.__version__}; FAISS LSQ trained "
          f"{a.faiss_train_iters} rounds", flush=True)
    print("\n| data | bytes | qkern train s | qkern MSE | FAISS MSE | encode s qkern / FAISS "
          "| ratio |\n|---|--:|--:|--:|--:|--:|--:|")
    for name in a.datasets.split(","):
        ds = vq_data.load(name, None, False)
        for nb in [int(b) for b in a.bytes.split(",")]:
            t0 = time.perf_counter()
            q = vq.QKERN_MAKERS["LSQ"](ds.d, nb).train(ds.train)
            train_s = time.perf_counter() - t0
            f = faiss.index_factory(ds.d, f"LSQ{nb}x8")
            f.lsq.train_iters = a.faiss_train_iters
            f.train(ds.train)
            fns = {"qkern": lambda: q.encode(ds.base), "faiss": lambda: f.sa_encode(ds.base)}
            out = {k: fn() for k, fn in fns.items()}  # warm-up, and the codes
            med, _ = time_alternating(fns, a.repeats, warmup=0)
            mq = vq._mse(ds.base, q.decode(out["qkern"]))
            mf = vq._mse(ds.base, f.sa_decode(out["faiss"]))
            print(f"| {name} | {nb} | {train_s:.1f} | {mq:.5g} | {mf:.5g} | {med['qkern']:.4f} / "
                  f"{med['faiss']:.4f} | {med['qkern'] / med['faiss']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
