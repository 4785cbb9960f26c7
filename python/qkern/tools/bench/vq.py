"""``qkern bench vq``: qkern's vector quantizers beside FAISS's on real vectors, in one run.

For every data set (:mod:`.vq_data`: sklearn digits, 64-d; all-MiniLM-L6-v2 embeddings of
WikiText-2 sentences, 384-d), every code size (bytes per vector, 8 bits per sub-code) and
every method of :data:`METHODS` (a row each: its FAISS ``index_factory`` key and, once qkern
has it, a maker of the qkern quantizer), both libraries are trained on the same training set
and measured on the same base and queries:

- MSE: mean over the base vectors of the squared reconstruction error summed over the d
  coordinates (``decode(encode(base))``), in float64 for both;
- R@1, R@10: the fraction of queries whose exact nearest neighbour (squared L2, brute force in
  numpy float64 over the base; any one of several at exactly the same distance counts) is among
  the first 1 / 10 results of the library's quantized search: ADC over the encoded base (the
  query exact, each base vector decoded), qkern's ``search`` (or, for a quantizer without one,
  exact distances to the decoded base), FAISS's ``index.search`` after ``index.add``;
- train s: one training run (wall clock, after the data are in memory; each library's first
  training of a data set is preceded by an untimed one, a warm-up);
- encode s: encoding the base set, median of ``repeats`` samples after one warm-up, the two
  libraries alternating, each sample after 20 ms idle (``SETTLE_S``: the other library's
  spinning threads let go of the cores); an encode shorter than 50 ms is sampled as a block of
  back-to-back calls after one untimed call (``MIN_BLOCK_S``), per call.

Both run on ``--threads`` threads (``qkern.set_num_threads``, ``faiss.omp_set_num_threads``);
FAISS is imported here only (the library never imports it).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ... import get_num_threads, set_num_threads
from ...vq import OPQ, AdditiveQuantizer, ProductQuantizer, ResidualQuantizer, VQBase
from . import vq_data
from .timing import machine_line, time_alternating, time_block

__all__ = ["METHODS", "QKERN_MAKERS", "Method", "exact_nearest", "main", "recall_at", "run_vq"]


def _pq(d: int, nbytes: int) -> VQBase:
    return ProductQuantizer(d, m=nbytes, nbits=8)


#: method name -> maker (d, bytes per vector) -> an untrained qkern quantizer of that code
#: size. The methods of METHODS without an entry here run FAISS only (when asked for by name).
#: qkern's RQ and LSQ (additive) train their stages as FAISS's RQ does by default (progressive-
#: dimension k-means in 10 steps, a beam of 5: FAISS's max_beam_size), LSQ with FAISS's 10
#: iterations a step, RQ with qkern's default 25 (at 10 digits RQ 8 came out 0.09 % above
#: FAISS's MSE on an Intel machine; docs/vq.md); RQ then encodes with a beam of 12
#: (encode_beam_size: of the beams measured on both data sets at 8, 16 and 32 bytes, the
#: narrowest whose MSE is at or below FAISS's on all six at both iteration counts; a beam
#: search is not monotone in its width; docs/vq.md), LSQ starts from the beam search (5) and
#: re-encodes by ILS,
#: its start (RQ codebooks or FAISS's random codes) chosen on held-out training vectors
#: (init="auto"). OPQ retrains its PQ each outer iteration as FAISS's OPQMatrix does
#: (warm_start=False). FAISS runs its index_factory defaults.
QKERN_MAKERS: dict[str, Callable[[int, int], VQBase]] = {
    "PQ": _pq,
    "OPQ": lambda d, nbytes: OPQ(d, m=nbytes, nbits=8, warm_start=False),
    "RQ": lambda d, nbytes: ResidualQuantizer(d, m=nbytes, nbits=8, beam_size=5,
                                              progressive_dim_steps=10, encode_beam_size=12),
    "LSQ": lambda d, nbytes: AdditiveQuantizer(d, m=nbytes, nbits=8, beam_size=5, n_iter=10,
                                               progressive_dim_steps=10, init="auto"),
}


@dataclass(frozen=True)
class Method:
    """One row kind of the table: ``faiss`` is an ``index_factory`` key with ``{m}`` for the
    bytes per vector (every code is m sub-codes of 8 bits). PQ keys end in ``np``: no polysemous
    training (a re-ordering of the centroids for Hamming filtering that does not change the
    codes' error and takes most of IndexPQ's training time)."""

    name: str
    faiss: str
    note: str

    @property
    def qkern(self) -> Callable[[int, int], VQBase] | None:
        return QKERN_MAKERS.get(self.name)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("PQ", "PQ{m}x8np", "product quantizer, m sub-spaces of 256 centroids"),
    Method("OPQ", "OPQ{m},PQ{m}x8np", "PQ after a learned rotation (faiss.OPQMatrix)"),
    Method("RQ", "RQ{m}x8", "residual quantizer, m stages of 256 (faiss beam search)"),
    Method("LSQ", "LSQ{m}x8", "additive quantizer by local search (faiss LSQ)"),
]}


# ---- ground truth and recall ------------------------------------------------------------------
def exact_nearest(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Boolean (n_queries, n_base): True where the base vector is at the smallest squared L2
    distance of that query (ties all True). Brute force in float64."""
    b = np.asarray(base, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    dist = (q * q).sum(1)[:, None] - 2.0 * (q @ b.T) + (b * b).sum(1)[None, :]
    return dist <= dist.min(axis=1, keepdims=True)


def recall_at(ids: np.ndarray, nearest: np.ndarray, k: int) -> float:
    """Fraction of queries with one of their exact nearest neighbours (``nearest`` from
    :func:`exact_nearest`) among the first ``k`` of ``ids`` (n_queries, >= k) (ids < 0, FAISS's
    "no result", never count)."""
    ids = np.asarray(ids)[:, :k]
    if ids.shape[0] != nearest.shape[0] or ids.shape[1] < k:
        raise ValueError(f"ids of shape {ids.shape} for {nearest.shape[0]} queries and k = {k}")
    ok = ids >= 0
    hit = nearest[np.arange(ids.shape[0])[:, None], np.where(ok, ids, 0)] & ok
    return float(hit.any(axis=1).mean())


def _mse(x: np.ndarray, x_hat: np.ndarray) -> float:
    return float(((np.asarray(x_hat, np.float64) - x) ** 2).sum(axis=1).mean())


def _decoded_search(x_hat: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    b, q = np.asarray(x_hat, np.float64), np.asarray(queries, np.float64)
    dist = (b * b).sum(1)[None, :] - 2.0 * (q @ b.T)
    return np.argsort(dist, axis=1, kind="stable")[:, :k]


# ---- the two libraries behind one face ----------------------------------------------------
class _Qkern:
    lib = "qkern"

    def __init__(self, maker: Callable[[int, int], VQBase], d: int, nbytes: int):
        self.q = maker(d, nbytes)
        if self.q.code_size_bits != 8 * nbytes:
            raise ValueError(f"{self.q!r} has {self.q.code_size_bits} code bits, not "
                             f"{8 * nbytes}")

    def train(self, x):
        self.q.train(x)

    def encode(self, x):
        return self.q.encode(x)

    def decode(self, codes):
        return self.q.decode(codes)

    def search(self, base, codes, queries, k):
        if hasattr(self.q, "search"):
            return self.q.search(queries, codes, k)[1]
        return _decoded_search(self.q.decode(codes), queries, k)


class _Faiss:
    lib = "faiss"

    def __init__(self, faiss, key: str, d: int):
        self.faiss, self.index = faiss, faiss.index_factory(d, key)

    def train(self, x):
        self.index.train(x)

    def encode(self, x):
        return self.index.sa_encode(x)

    def decode(self, codes):
        return self.index.sa_decode(codes)

    def search(self, base, codes, queries, k):
        self.index.reset()
        self.index.add(base)
        return self.index.search(queries, k)[1]


def _import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("qkern bench vq compares with FAISS: pip install faiss-cpu") from e
    return faiss


# ---- the bench ------------------------------------------------------------------------------
@dataclass
class Result:
    method: str
    nbytes: int
    lib: str
    mse: float
    r1: float
    r10: float
    train_s: float
    encode_s: float


#: idle time before each timed block of encodes: the other library's threads (FAISS's OpenMP
#: workers, qkern's pool, numpy's BLAS) spin for a while after a call and would take the 2
#: cores from a millisecond-long encode that follows (digits OPQ 8: 3.8 ms alternating
#: without it, 0.95 ms alone)
SETTLE_S = 0.02
#: an encode shorter than this is timed as a block of back-to-back calls at least this long,
#: after one untimed call (which wakes the library's threads; a lone call after the idle pause
#: measures the wake-up: FAISS's digits OPQ encode 1.6 ms -> 16 ms)
MIN_BLOCK_S = 0.05


def _time_encodes(impls, x: np.ndarray, repeats: int) -> dict[str, float]:
    """Median seconds per encode of ``x`` for each library, libraries alternating; each sample
    after ``SETTLE_S`` idle, short encodes as blocks (``MIN_BLOCK_S``)."""
    fns = {im.lib: (lambda im=im: im.encode(x)) for im in impls}
    inner = {}
    for lib, f in fns.items():  # the warm-up call sizes the block
        t0 = time.perf_counter()
        f()
        inner[lib] = max(1, min(100, int(MIN_BLOCK_S / max(time.perf_counter() - t0, 1e-6))))

    def sample(lib: str) -> float:
        return time_block(fns[lib], inner[lib], SETTLE_S, fns[lib] if inner[lib] > 1 else None)

    return time_alternating(fns, repeats, 0, sample=sample)[0]


def _measure(makers, ds: vq_data.VQData, nearest, repeats: int, method: str, nbytes: int,
             warm: set[str]):
    """One (method, size) for each library; ``warm``: the libraries that have trained already
    in this run (the others first train a throwaway copy, untimed: first-call costs)."""
    impls = [make() for make in makers]
    for make, im in zip(makers, impls):
        if im.lib not in warm:
            make().train(ds.train)
            warm.add(im.lib)
    out = {}
    codes, train_s = {}, {}
    for im in impls:
        t0 = time.perf_counter()
        im.train(ds.train)
        train_s[im.lib] = time.perf_counter() - t0
        codes[im.lib] = im.encode(ds.base)
    enc = _time_encodes(impls, ds.base, repeats)
    for im in impls:
        ids = im.search(ds.base, codes[im.lib], ds.queries, 10)
        out[im.lib] = Result(method, nbytes, im.lib, _mse(ds.base, im.decode(codes[im.lib])),
                             recall_at(ids, nearest, 1), recall_at(ids, nearest, 10),
                             train_s[im.lib], enc[im.lib])
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b > 0 else "-"


def table(rows: list[Result]) -> list[str]:
    lines = ["| method | bytes | lib | MSE | R@1 | R@10 | train s | encode s | MSE qkern/faiss "
             "| encode qkern/faiss |", "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    by = {(r.method, r.nbytes, r.lib): r for r in rows}
    for r in rows:
        peer = by.get((r.method, r.nbytes, "faiss")) if r.lib == "qkern" else None
        mse_r = _ratio(r.mse, peer.mse) if peer else ""
        enc_r = _ratio(r.encode_s, peer.encode_s) if peer else ""
        lines.append(f"| {r.method} | {r.nbytes} | {r.lib} | {r.mse:.4g} | {r.r1:.3f} "
                     f"| {r.r10:.3f} | {r.train_s:.3f} | {r.encode_s:.4f} | {mse_r} | {enc_r} |")
    return lines


def run_vq(datasets: list[str], sizes: list[int], methods: list[str], threads: int = 2,
           repeats: int = 5, cache=None, progress: bool = True,
           data: dict[str, vq_data.VQData] | None = None) -> str:
    """The Markdown report (see the module docstring); ``data`` gives prebuilt data sets by
    name (else they are loaded / built with :func:`.vq_data.load`)."""
    faiss = _import_faiss()
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    old_q, old_f = get_num_threads(), faiss.omp_get_max_threads()
    set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    try:
        lines = [machine_line(threads) + f"; faiss {faiss.__version__}", "",
                 "MSE: squared error per base vector (summed over d); R@k: exact nearest "
                 "neighbour among the first k of the ADC search; train s: one run; encode s: "
                 f"the base set, median of {repeats} after a warm-up, libraries alternating, "
                 f"each after {1e3 * SETTLE_S:g} ms idle; encodes under {1e3 * MIN_BLOCK_S:g} ms "
                 "as blocks of calls (after an untimed one), per call.",
                 ""]
        for name in datasets:
            ds = (data or {}).get(name) or vq_data.load(name, cache, progress)
            nearest = exact_nearest(ds.base, ds.queries)
            lines += [f"### {name}", "", ds.note, ""]
            rows: list[Result] = []
            warm: set[str] = set()
            for mname in methods:
                meth = METHODS[mname]
                for nbytes in sizes:
                    if ds.d % nbytes:
                        lines.append(f"({mname} {nbytes} bytes skipped: d = {ds.d} is not "
                                     f"divisible by {nbytes})")
                        continue
                    key = meth.faiss.format(m=nbytes)
                    makers = [lambda: _Faiss(faiss, key, ds.d)]
                    if meth.qkern:
                        makers.insert(0, lambda: _Qkern(meth.qkern, ds.d, nbytes))
                    res = _measure(makers, ds, nearest, repeats, mname, nbytes, warm)
                    rows += list(res.values())
            lines += table(rows) + [""]
        return "\n".join(lines)
    finally:
        set_num_threads(old_q)
        faiss.omp_set_num_threads(old_f)


def _ints(s: str) -> list[int]:
    try:
        v = [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {s!r}") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {s!r}")
    return v


def _names(s: str) -> list[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="qkern bench vq", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: digits only, 8 and 16 bytes, 3 repeats (seconds)")
    p.add_argument("--datasets", type=_names, default=None,
                   help="comma-separated: digits, minilm (default both; digits with --quick)")
    p.add_argument("--bytes", type=_ints, default=None, dest="sizes",
                   help="bytes per vector, comma-separated (default 8,16,32; 8,16 with --quick)")
    p.add_argument("--methods", type=_names, default=None,
                   help=f"comma-separated of {', '.join(METHODS)} (default: PQ with --quick, "
                        f"else those qkern has: {', '.join(QKERN_MAKERS)}; the others run FAISS "
                        "only)")
    p.add_argument("--threads", type=int, default=2, help="threads for both libraries (2)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed encodes per library (default 5; 3 with --quick)")
    p.add_argument("--cache", default=None,
                   help="folder of the cached data sets (default ~/.cache/qkern)")
    a = p.parse_args(argv)
    datasets = a.datasets or (["digits"] if a.quick else ["digits", "minilm"])
    methods = a.methods or (["PQ"] if a.quick else [m for m in METHODS if m in QKERN_MAKERS])
    bad = [d for d in datasets if d not in vq_data.DATASETS]
    bad += [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown data set(s) / method(s) {bad}; data sets: "
                f"{', '.join(vq_data.DATASETS)}; methods: {', '.join(METHODS)}")
    if a.threads < 1 or (a.repeats is not None and a.repeats < 1):
        p.error("--threads and --repeats must be >= 1")
    sizes = a.sizes or ([8, 16] if a.quick else [8, 16, 32])
    repeats = a.repeats or (3 if a.quick else 5)
    print(run_vq(datasets, sizes, methods, a.threads, repeats, a.cache))
    return 0
