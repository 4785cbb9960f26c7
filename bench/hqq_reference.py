"""qkern's HQQ beside the reference implementation (the ``hqq`` package from PyPI, mobiusml/hqq)
on the same weights, in the same run: per-weight l_0.7 error, MSE and seconds on random
matrices and on every block linear of the wikitext-bytelm model, then the model's bits per byte
on WikiText-2 test (48 windows of 256 bytes) with every block linear quantized by each (and
qkern's through ``quantize_model``, running on the fused kernels).

    pip install --no-deps --target /work/refs/hqq hqq termcolor   # (or unpack its sdist there)
    PYTHONPATH=python:/work/refs/hqq python bench/hqq_reference.py [--quick]

The hqq package runs with its own defaults (``hqq_base_quant_config``: axis=1, round_zero for
4-bit, 20 proximal iterations with early stopping on the mean |W - W_r|); qkern with
HQQConfig's (the paper's: float min-max init, early stopping on the l_p error). A layer whose
input size the group does not divide is quantized per output channel by both (as the qkern
pipeline does). Without the hqq package the qkern column is printed alone.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

import qkern
from qkern import HQQConfig
from qkern.models import load_llama
from qkern.models.llama import bits_per_byte
from qkern.quantization.algorithms.hqq import hqq_quantize

ROOT = Path(__file__).resolve().parents[1]
P = 0.7

try:
    from hqq.core.quantize import Quantizer as HQQPackage  # the reference implementation
except ImportError as e:  # pragma: no cover - depends on the environment
    HQQPackage = None
    WHY = str(e)


def ref_hqq(w: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """The hqq package's dequantized weight (its defaults for ``bits`` / ``g``)."""
    wq, meta = HQQPackage.quantize(w, nbits=bits, group_size=g, axis=1, optimize=True,
                                   round_zero=bits == 4, bitpack=False, device="cpu")
    return ((wq.float() - meta["zero"]) * meta["scale"]).reshape(w.shape)


def ours(w: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    return hqq_quantize(w, bits, g, round_zero=bits == 4).dequantize()  # HQQConfig's default


def rtn(w: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    return hqq_quantize(w, bits, g, iters=0).dequantize()  # HQQ's min-max init


METHODS = {"rtn (min-max)": rtn, "qkern HQQ": ours}


def methods() -> dict:
    m = dict(METHODS)
    if HQQPackage is not None:
        m["hqq package"] = ref_hqq
    return m


def errors(w: torch.Tensor, wr: torch.Tensor) -> tuple[float, float]:
    d = (w.double() - wr.double())
    return float(d.abs().pow(P).mean()), float((d * d).mean())


def timed(fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t0


def group_for(k: int, g: int | None) -> int:
    return k if g is None or k % g else g


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{n}"]


def weight_table(weights: dict[str, torch.Tensor], settings) -> None:
    ms = methods()
    print(f"\n{'weights':<22}{'bits/g':>8}  " + "".join(f"{m:>36}" for m in ms))
    print(f"{'':<30}  " + "".join(f"{'l0.7 err':>12}{'MSE':>12}{'s':>12}" for _ in ms))
    for wname, w in weights.items():
        for bits, g in settings:
            gg = group_for(w.shape[1], g)
            row = f"{wname:<22}{f'w{bits} g{gg}':>8}  "
            for fn in ms.values():
                wr, sec = timed(fn, w, bits, gg)
                lp, mse = errors(w, wr)
                row += f"{lp:>12.4e}{mse:>12.4e}{sec:>12.3f}"
            print(row)
        sys.stdout.flush()


def model_table(model: nn.Module, data: bytes, settings, n_windows: int) -> None:
    ms = methods()
    fp = bits_per_byte(model, data, n_windows=n_windows)
    print(f"\nwikitext-bytelm bits per byte, WikiText-2 test, {n_windows} x 256 bytes "
          f"(fp32: {fp:.4f})")
    print(f"{'setting':<12}" + "".join(f"{m:>26}" for m in [*ms, "qkern HQQ on kernels"])
          + "   (bpb / quantize s)")
    for bits, g in settings:
        row = f"{f'w{bits} ' + ('g' + str(g) if g else 'per-ch'):<12}"
        for fn in ms.values():
            q = copy.deepcopy(model)
            t0 = time.perf_counter()
            with torch.no_grad():
                for _, lin in block_linears(q):
                    w = lin.weight.detach().float()
                    lin.weight.copy_(fn(w, bits, group_for(w.shape[1], g)))
            sec = time.perf_counter() - t0
            row += f"{bits_per_byte(q, data, n_windows=n_windows):>18.4f}{sec:>8.2f}"
        # the same HQQ through quantize_model: QuantLinear on the fused w4 / w23 kernels
        t0 = time.perf_counter()
        q = qkern.quantize_model(model, HQQConfig(bits=bits, group_size=g))
        sec = time.perf_counter() - t0
        row += f"{bits_per_byte(q, data, n_windows=n_windows):>18.4f}{sec:>8.2f}"
        print(row)
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer weights and settings")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if HQQPackage is None:
        print(f"hqq package unavailable ({WHY}); install it with `pip install --no-deps --target "
              "/work/refs/hqq hqq termcolor` and put that on PYTHONPATH. qkern alone below.")
    torch.manual_seed(0)
    n = 512 if args.quick else 1024
    weights = {f"gaussian {n}x{n}": torch.randn(n, n) * 0.02,
               f"student-t(3) {n}x{n}": torch.distributions.StudentT(3.0).sample((n, n)) * 0.02}
    model = load_llama(ROOT / "models/wikitext-bytelm")
    lins = block_linears(model)
    for name, lin in (lins[:7] if args.quick else lins):
        weights[name.replace("model.layers.", "L")] = lin.weight.detach().float()
    settings = [(4, 64), (3, 64), (2, 64)] if args.quick else \
        [(4, 64), (4, 128), (3, 64), (3, 128), (2, 32), (2, 64)]
    weight_table(weights, settings)
    data = (ROOT / "data/wikitext-2/wiki.test.tokens").read_bytes()
    model_settings = [(4, 128), (3, 128), (4, None), (2, 64)]
    model_table(model, data, model_settings[:2] if args.quick else model_settings,
                16 if args.quick else 48)


if __name__ == "__main__":
    main()
