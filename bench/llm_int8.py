"""LLM.int8 bench: qkern's mixed 8/16-bit path (QuantLinear act="int8_mixed", threshold 6) beside
plain per-token W8A8 (act="int8_dynamic"), the float nn.Linear and, when importable,
bitsandbytes' Linear8bitLt (threshold 6, its CPU path) on the same weights and inputs.

    PYTHONPATH=python:/work/refs/bnb python bench/llm_int8.py [--k 4096] [--n 4096] [--threads 2]

bitsandbytes is installed beside qkern (``pip install --no-deps --target /work/refs/bnb
bitsandbytes``), never as a dependency. Prints, per M, the median time of each path and its
relative error ``||y - y_float|| / ||y_float||`` on inputs with ~0.2 % outlier feature
dimensions (|x| ~ 20, as the paper's emergent features) and on inputs without outliers.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch
from torch import nn

import qkern
from qkern.nn import QuantLinear


def bnb_linear(lin: nn.Linear, threshold: float):
    """bitsandbytes' LLM.int8 layer for ``lin``, or None with the reason printed."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        print(f"bitsandbytes: not importable ({e}); add /work/refs/bnb to PYTHONPATH")
        return None
    layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=True,
                                has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(lin.weight.detach().clone(), requires_grad=False,
                                     has_fp16_weights=False)
    layer.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    layer = layer.to("cpu").eval()  # quantizes the weight; eval: MatMul8bitLt, not W8A16
    print(f"bitsandbytes {bnb.__version__}: Linear8bitLt(threshold={threshold}) on CPU")
    return layer


def median_ms(paths: dict, x, reps: int) -> dict[str, float]:
    """Median ms per path, the paths interleaved in each round (a shared machine's load hits
    them alike)."""
    times: dict[str, list[float]] = {p: [] for p in paths}
    for f in paths.values():
        f(x)
    for _ in range(reps):
        for p, f in paths.items():
            t0 = time.perf_counter()
            f(x)
            times[p].append(time.perf_counter() - t0)
    return {p: 1e3 * statistics.median(v) for p, v in times.items()}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 32, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--threshold", type=float, default=6.0)
    ap.add_argument("--outliers", type=int, default=8, help="outlier feature dimensions")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    qkern.set_num_threads(args.threads)
    torch.manual_seed(0)
    lin = nn.Linear(args.k, args.n)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    mixed = QuantLinear.from_float(lin, "int8", group_size=None, act="int8_mixed",
                                   threshold=args.threshold)
    plain = QuantLinear.from_float(lin, "int8", group_size=None, act="int8_dynamic")
    warnings.simplefilter("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # logs float32 -> float16 per call
    bnb = bnb_linear(lin, args.threshold)
    paths = {"float": lin, "qkern W8A8": plain, "qkern LLM.int8": mixed}
    if bnb is not None:
        paths["bnb LLM.int8"] = bnb
    cols = torch.randperm(args.k)[:args.outliers]
    print(f"K={args.k} N={args.n}, {args.threads} threads, ISA {qkern.get_isa()}, "
          f"{args.outliers} outlier dims of |x| ~ 20 (threshold {args.threshold})")
    head = "".join(f"{p:>17}" for p in paths)
    print(f"{'M':>5} {'':>14}{head}")
    with torch.inference_mode():
        for m in args.ms:
            x = torch.randn(m, args.k).clamp(-4, 4)
            xo = x.clone()
            xo[:, cols] = 20.0 * torch.randn(m, len(cols)).sign()
            reps = max(7, min(50, 2000 // m))
            t = median_ms(paths, xo, reps)
            print(f"{m:>5} {'ms':>14}" + "".join(f"{t[p]:>17.3f}" for p in paths))
            for what, inp in (("err outliers", xo), ("err no outl.", x)):
                ref = lin(inp).double()
                e = {p: rel_err(f(inp), ref) for p, f in paths.items()}
                print(f"{'':>5} {what:>14}" + "".join(f"{e[p]:>17.2e}" for p in paths))


if __name__ == "__main__":
    main()
