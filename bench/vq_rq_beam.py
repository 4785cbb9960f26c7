"""qkern's RQ encoder at FAISS's beam (5) and at the bench's (12), beside FAISS, in one process.

The bench's RQ maker trains at beam 5 (FAISS's ``max_beam_size``) and encodes at 12. This
script trains that maker's codebooks once per (data set, size), encodes the base at beams 5
and 12 (``--beams``), and FAISS's ``RQ{m}x8`` index (trained on the same vectors) at its own
beam of 5; the encode seconds are the median of ``--repeats`` runs, the encoders alternating.
MSE: squared error per base vector, as the bench computes it.

    PYTHONPATH=python python bench/vq_rq_beam.py --datasets digits,minilm --bytes 8,16,32
"""

from __future__ import annotations

import argparse

from qkern import set_num_threads
from qkern.tools.bench import vq, vq_data
from qkern.tools.bench.timing import machine_line, time_alternating
from qkern.vq.search import rq_beam_encode, rq_cross_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="digits,minilm")
    p.add_argument("--bytes", default="8,16,32")
    p.add_argument("--beams", default="5,12", help="qkern's encode beams")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    faiss = vq._import_faiss()
    set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    beams = [int(b) for b in a.beams.split(",")]
    print(machine_line(a.threads) + f"; faiss {faiss.__version__}", flush=True)
    print("\n| data | bytes | FAISS beam 5: MSE, encode s | " + " | ".join(
        f"qkern beam {b}: MSE (x FAISS), encode s (x FAISS)" for b in beams) + " |")
    print("|---|--:|--:|" + "--:|" * len(beams))
    for name in a.datasets.split(","):
        ds = vq_data.load(name, None, False)
        for nb in [int(b) for b in a.bytes.split(",")]:
            q = vq.QKERN_MAKERS["RQ"](ds.d, nb).train(ds.train)
            books, cross = q.codebooks, rq_cross_table(q.codebooks)
            f = faiss.index_factory(ds.d, f"RQ{nb}x8")
            f.train(ds.train)
            fns = {"faiss": lambda: f.sa_encode(ds.base)}
            for b in beams:
                fns[b] = lambda b=b: rq_beam_encode(ds.base, books, b, cross)
            out = {k: fn() for k, fn in fns.items()}  # warm-up, and the codes
            med, _ = time_alternating(fns, a.repeats, warmup=0)
            fm = vq._mse(ds.base, f.sa_decode(out["faiss"]))
            cells = []
            for b in beams:
                m = vq._mse(ds.base, q.decode(out[b]))
                cells.append(f"{m:.5g} ({m / fm:.4f}), {med[b]:.4f} ({med[b] / med['faiss']:.3f})")
            print(f"| {name} | {nb} | {fm:.5g}, {med['faiss']:.4f} | " + " | ".join(cells) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
