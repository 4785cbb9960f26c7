"""GPTQ on one 4096 x 4096 layer: qkern's gptq_quantize beside the reference implementation
(IST-DASLab/gptq, loaded at run time from the bare mirror that the `fetch` tool leaves under
/work/.mirror, never copied into qkern), same weight, same H, 2 threads.

    PYTHONPATH=python python bench/gptq_reference.py [--k 4096] [--reps 2]
    PYTHONPATH=python python bench/gptq_reference.py --bytelm   # every layer of the bytelm

The inputs follow a low-rank + noise model with heavy-tailed channel scales (LLM-like):
X = (Z A + sigma E) D over T = 128 x 2048 tokens, Z (T, 256) Gaussian, A (256, K), D diagonal
log-normal with a few outlier channels. Its Gram matrix X^T X / T is formed from the factors
(Z^T Z / T exactly; E^T E / T by its expectation I, the fluctuation of which is ~T^-1/2)
instead of a (T, K) x (K, T) product. The error printed is ||W X - Q X||^2 / T =
sum over rows of (w - q) gram (w - q)^T.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from qkern import quantize
from qkern.models.assets import shipped_path
from qkern.quantization.algorithms.gptq import gptq_quantize, output_error

MIRROR = os.environ.get("GPTQ_MIRROR", "/work/.mirror/IST-DASLab+gptq/repo")


def load_reference():
    """gptq.py / quant.py of IST-DASLab/gptq extracted from the mirror into a temp dir and
    imported (None, reason when the mirror is absent)."""
    if not os.path.isdir(MIRROR):
        return None, f"mirror {MIRROR} not found (fetch github:IST-DASLab/gptq first)"
    tmp = tempfile.mkdtemp(prefix="gptq_ref_")
    for name in ("gptq.py", "quant.py"):
        src = subprocess.run(["git", "--git-dir", MIRROR, "show", f"HEAD:{name}"],
                             check=True, capture_output=True).stdout
        with open(os.path.join(tmp, name), "wb") as fh:
            fh.write(src)
    sys.path.insert(0, tmp)
    torch.cuda.synchronize = lambda *a, **k: None  # the reference syncs CUDA after its loop
    with contextlib.redirect_stdout(io.StringIO()):
        quant = importlib.import_module("quant")
        gptq = importlib.import_module("gptq")
    return (gptq, quant), None


def make_problem(k: int, n: int, tokens: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    r = 256
    a = torch.randn(r, k, generator=gen, dtype=torch.float64) / r ** 0.5
    zz = torch.zeros(r, r, dtype=torch.float64)
    for _ in range(0, tokens, 16384):  # Z^T Z over the tokens, in chunks
        z = torch.randn(16384, r, generator=gen, dtype=torch.float64)
        zz += z.T @ z
    zz /= tokens
    sigma = 0.3
    d = torch.exp(0.6 * torch.randn(k, generator=gen, dtype=torch.float64))
    d[torch.randperm(k, generator=gen)[: k // 256]] *= 20.0  # outlier channels
    gram = a.T @ zz @ a + sigma ** 2 * torch.eye(k, dtype=torch.float64)
    gram = d[:, None] * gram * d[None, :]
    w = torch.randn(n, k, generator=gen) * 0.02 * (1 + torch.rand(n, 1, generator=gen))
    return w, gram


def run_reference(mods, w, gram, bits, group, sym, act):
    gptq_mod, quant = mods
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = w.clone()
    g = gptq_mod.GPTQ(layer)
    g.H = (2.0 * gram).float()  # the reference's H = 2 X X^T / N
    g.nsamples = 1
    g.quantizer = quant.Quantizer()
    g.quantizer.configure(bits, perchannel=True, sym=sym, mse=False)
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        g.fasterquant(blocksize=128, percdamp=0.01, groupsize=group, actorder=act,
                      static_groups=act)
    return (time.perf_counter() - t0, time.process_time() - c0), layer.weight.data.clone()


def run_qkern(w, gram, bits, group, sym, act):
    t0, c0 = time.perf_counter(), time.process_time()
    res = gptq_quantize(w, gram, bits=bits, group_size=group, sym=sym, block_size=128,
                        act_order=act, static_groups=act)
    return (time.perf_counter() - t0, time.process_time() - c0), res.weight


def bytelm_layers(bits: int, group: int):
    """(name, weight, gram) of every block linear of models/wikitext-bytelm, the Gram matrices
    as qkern's pipeline measures them (64 x 256 bytes of WikiText-2 valid, GPTQ-quantized
    prefix)."""
    from qkern.models import load_llama
    from qkern.quantization import quantize_sequential, text_calibration
    from qkern.quantization.algorithms.gptq import GPTQConfig, GPTQQuantizer

    got = []

    class Recorder(GPTQQuantizer):
        def quantize_layer(self, name, linear, gram, cfg):
            got.append((name, linear.weight.detach().clone(), gram))
            return super().quantize_layer(name, linear, gram, cfg)

    model = load_llama(shipped_path("models/wikitext-bytelm"))
    cal = text_calibration(shipped_path("data/wikitext-2/wiki.valid.tokens"), "bytes", 64, 256)
    quantize_sequential(model, Recorder(GPTQConfig(bits=bits, group_size=group)), cal)
    return got


def main_bytelm(mods, reps: int) -> None:
    print("wikitext-bytelm: every block linear, the same (W, H) for both, times summed")
    print(f"{'setting':<20} {'ref s':>8} {'qkern s':>8} {'speedup':>8} "
          f"{'ref err':>11} {'qkern err':>11} {'err ratio':>9}")
    for bits, group, sym in ((4, 128, False), (3, 128, False), (4, 128, True)):
        layers = bytelm_layers(bits, group)
        tr = tq = er = eq = 0.0
        for _, w, gram in layers:
            bq, br = [], []
            for _ in range(reps):
                t, q_q = run_qkern(w, gram, bits, group, sym, False)
                bq.append(t[0])
                t, q_r = run_reference(mods, w, gram, bits, group, sym, False)
                br.append(t[0])
            tq, tr = tq + min(bq), tr + min(br)
            eq, er = eq + output_error(w, q_q, gram), er + output_error(w, q_r, gram)
        name = f"w{bits} g{group} {'sym' if sym else 'asym'}"
        print(f"{name:<20} {tr:8.2f} {tq:8.2f} {tr / tq:7.2f}x {er:11.4e} {eq:11.4e} "
              f"{eq / er:9.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=128 * 2048)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bytelm", action="store_true",
                    help="every linear of models/wikitext-bytelm instead of one big layer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mods, why = load_reference()
    if mods is None:
        print(f"SKIP reference: {why}")
        if args.bytelm:
            return
    if args.bytelm:
        main_bytelm(mods, args.reps)
        return
    w, gram = make_problem(args.k, args.n, args.tokens)
    print(f"layer {args.n}x{args.k}, {args.tokens} tokens, {args.threads} threads, "
          f"best of {args.reps}; wall s (CPU s of all threads)")
    print(f"{'setting':<20} {'ref s':>15} {'qkern s':>15} {'speedup':>13} "
          f"{'ref err':>11} {'qkern err':>11} {'err ratio':>9} {'RTN err':>11}")
    settings = ((4, 128, False, False), (3, 128, False, False), (4, 128, False, True),
                (4, 128, True, False), (3, 128, True, False))
    for bits, group, sym, act in settings:
        tq, tr, q_q, q_r = [], [], None, None
        for _ in range(args.reps):  # alternate, keep the best time of each
            t, q_q = run_qkern(w, gram, bits, group, sym, act)
            tq.append(t)
            if mods is not None:
                t, q_r = run_reference(mods, w, gram, bits, group, sym, act)
                tr.append(t)
        e_q = output_error(w, q_q, gram)
        rtn = quantize(w, f"int{bits}", granularity="group", axis=1, group_size=group,
                       symmetric=sym).dequantize()
        e_rtn = output_error(w, rtn, gram)
        name = f"w{bits} g{group} {'sym' if sym else 'asym'}{' act' if act else ''}"
        wq, cq = min(t[0] for t in tq), min(t[1] for t in tq)
        if mods is None:
            print(f"{name:<20} {'-':>15} {wq:7.2f} ({cq:5.1f}) {'-':>13} {'-':>11} "
                  f"{e_q:11.4e} {'-':>9} {e_rtn:11.4e}", flush=True)
            continue
        wr, cr = min(t[0] for t in tr), min(t[1] for t in tr)
        e_r = output_error(w, q_r, gram)
        print(f"{name:<20} {wr:7.2f} ({cr:5.1f}) {wq:7.2f} ({cq:5.1f}) {wr / wq:5.2f}x "
              f"({cr / cq:4.2f}x) {e_r:11.4e} {e_q:11.4e} {e_q / e_r:9.4f} {e_rtn:11.4e}",
              flush=True)


if __name__ == "__main__":
    main()
