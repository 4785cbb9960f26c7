"""One row (or one pair of rows) of the ``qkern bench vq`` tables, in a process of its own.

The rows of docs/vq.md whose FAISS training takes minutes are measured one (data set, method,
size, library) at a time: trained once (no warm-up copy, unlike ``qkern bench vq``), the base
encoded once (timed), MSE and R@1 / R@10 computed as the bench does, through the bench's own
wrappers (``_Qkern``, ``_Faiss``) and makers. Prints the rows in the bench's table format.

    PYTHONPATH=python python bench/vq_row.py --dataset digits --method LSQ --bytes 16 \
        --libs faiss --threads 2
"""

from __future__ import annotations

import argparse
import time

from qkern import set_num_threads
from qkern.tools.bench import vq, vq_data
from qkern.tools.bench.timing import machine_line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=sorted(vq_data.DATASETS))
    p.add_argument("--method", required=True, choices=list(vq.METHODS))
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--libs", default="qkern,faiss", help="comma-separated: qkern, faiss")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lsq-init", choices=("rq", "random", "auto"), default=None,
                   help="qkern's LSQ start (AdditiveQuantizer init) instead of the bench "
                        "maker's: rq, FAISS's random codes, or auto (the better on held-out "
                        "training vectors)")
    a = p.parse_args()
    faiss = vq._import_faiss()
    set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    ds = vq_data.load(a.dataset, None, False)
    nearest = vq.exact_nearest(ds.base, ds.queries)
    meth = vq.METHODS[a.method]
    print(machine_line(a.threads) + f"; faiss {faiss.__version__}", flush=True)
    rows = []
    for lib in [t.strip() for t in a.libs.split(",") if t.strip()]:
        if lib == "qkern":
            make = meth.qkern
            if a.lsq_init is not None and a.method == "LSQ":
                def make(d, nbytes, base=meth.qkern, init=a.lsq_init):
                    q = base(d, nbytes)
                    return type(q)(**{**q.config(), "init": init})
            im = vq._Qkern(make, ds.d, a.bytes)
        elif lib == "faiss":
            im = vq._Faiss(faiss, meth.faiss.format(m=a.bytes), ds.d)
        else:
            raise SystemExit(f"unknown library {lib!r}")
        t0 = time.perf_counter()
        im.train(ds.train)
        train_s = time.perf_counter() - t0
        print(f"{a.dataset} {a.method} {a.bytes} {lib}: trained in {train_s:.1f} s", flush=True)
        t0 = time.perf_counter()
        codes = im.encode(ds.base)
        encode_s = time.perf_counter() - t0
        ids = im.search(ds.base, codes, ds.queries, 10)
        rows.append(vq.Result(a.method, a.bytes, lib, vq._mse(ds.base, im.decode(codes)),
                              vq.recall_at(ids, nearest, 1), vq.recall_at(ids, nearest, 10),
                              train_s, encode_s))
    print("\n".join(vq.table(rows)), flush=True)


if __name__ == "__main__":
    main()
