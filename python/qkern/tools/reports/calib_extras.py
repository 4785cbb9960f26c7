"""Calibration extras on the digits models (qkern.models.digits): three tables.

1. :func:`ema_table`: static W8A4 (StaticConfig, uint4 activations) with the activation
   ranges from min-max, torch.ao's moving average, the running mean of the batches' ranges and
   the bias-corrected EMA, the 256 calibration images cut into batches of 4 / 16 / 64, over
   three seeds (which training images calibrate, in which order): mean and spread of the test
   accuracy.
2. :func:`round_aware_table`: 2 / 3-bit per-channel weights: RTN; the same number of Adam
   fine-tune steps on the labels without the regulariser, then RTN (the control); with the
   grid regulariser, then rounded on the fixed grid; and RoundAwareConfig (no labels: output
   MSE to the float model + regulariser).
3. :func:`relaxed_table`: QAT (the QAT report's fine-tune) at W4A4 / W3A3 / W2A2 with STE,
   LSQ and relaxed quantization (concrete, and RQ-ST), converted to qkern's kernels.

``python -m qkern.tools.reports.calib_extras`` prints them (docs/calibration_extras.md)."""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from ... import quantization as Q
from ...models import digits as D
from ...quantization.algorithms.round_aware import layer_grids
from . import qat as R

__all__ = ["EMA_OBSERVERS", "ema_table", "relaxed_table", "round_aware_table"]

#: label -> StaticConfig observer name
EMA_OBSERVERS = {"min-max": "minmax", "moving average (c=0.01)": "moving_average",
                 "running mean": "running_mean", "EMA beta=0.9, bias-corrected": "ema"}


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def ema_table(models: dict, data: D.DigitsData, batch_sizes=(4, 16, 64), seeds=(0, 1, 2),
              n_calib: int = 256) -> str:
    lines = [f"Static W8A4 (int8 weights per channel, uint4 activations): test accuracy, mean "
             f"(min-max) over seeds {list(seeds)}; {n_calib} training images cut into "
             "calibration batches", ""]
    head = "| model | observer | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |"
    lines += [head, "|---" * (len(batch_sizes) + 2) + "|"]
    for kind, model in models.items():
        for label, obs in EMA_OBSERVERS.items():
            cells = []
            for b in batch_sizes:
                accs = []
                for seed in seeds:
                    perm = torch.randperm(len(data.y_train),
                                          generator=torch.Generator().manual_seed(seed))
                    calib = list(data.x_train[perm[:n_calib]].split(b))
                    cfg = Q.StaticConfig(fmt="int8", act_fmt="uint4", act_symmetric=False,
                                         observer=obs)
                    q = _quiet(Q.quantize_model, model, cfg, calib)
                    accs.append(D.accuracy(q, data.x_test, data.y_test))
                cells.append(f"{statistics.mean(accs):.4f} ({min(accs):.3f}-{max(accs):.3f})")
            lines.append(f"| {kind} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ce_finetune(model, data, grids, steps, lam, lr=1e-3, batch=64):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.y_train), generator=g)
    batches = [(data.x_train[i], data.y_train[i]) for i in idx.split(batch)]
    Q.round_aware_finetune(m, {n: grids[n] for n in grids}, batches,
                           lambda mod, b: F.cross_entropy(mod(b[0]), b[1]),
                           steps=steps, lr=lr, lam=lam)
    return m


def round_aware_table(models: dict, data: D.DigitsData, bits=(2, 3), steps: int = 200,
                      lam: float = 1.0) -> str:
    lines = [f"Round-aware shaping: {steps} Adam steps (lr 1e-3, batches of 64 training "
             f"images), lambda ramped 0 -> {lam}, cos penalty; weights int{{bits}} per output "
             "channel, activations float; test accuracy (fine-tune time)", ""]
    lines += ["| model | row | " + " | ".join(f"W{b}" for b in bits) + " |",
              "|---" * (len(bits) + 2) + "|"]
    for kind, model in models.items():
        names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear,
                                                                       torch.nn.Conv2d))]
        rows: dict[str, list[str]] = {"RTN": [], "fine-tune (CE, no regulariser) -> RTN": [],
                                      "fine-tune (CE + grid regulariser) -> RTN on the grid": [],
                                      "RoundAwareConfig (no labels: MSE to float + reg.)": []}
        t0 = time.perf_counter()
        control = _ce_finetune(model, data, {}, steps, 0.0)
        t_ctrl = time.perf_counter() - t0
        for b in bits:
            fmt = f"int{b}"
            rtn = _quiet(Q.quantize_model, model, Q.WeightOnlyConfig(fmt=fmt, group_size=None))
            rows["RTN"].append(f"{D.accuracy(rtn, data.x_test, data.y_test):.4f}")
            qc = _quiet(Q.quantize_model, control, Q.WeightOnlyConfig(fmt=fmt, group_size=None))
            rows["fine-tune (CE, no regulariser) -> RTN"].append(
                f"{D.accuracy(qc, data.x_test, data.y_test):.4f} ({t_ctrl:.0f} s)")
            t0 = time.perf_counter()
            grids = layer_grids(model, {n: (fmt, None) for n in names})
            shaped = _ce_finetune(model, data, grids, steps, lam)
            _quiet(Q.round_on_grid, shaped, grids)
            rows["fine-tune (CE + grid regulariser) -> RTN on the grid"].append(
                f"{D.accuracy(shaped, data.x_test, data.y_test):.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
            t0 = time.perf_counter()
            calib = list(data.x_train.split(64))
            qr = _quiet(Q.quantize_model, model, Q.RoundAwareConfig(fmt=fmt, steps=steps,
                                                                     lam=lam), calib)
            rows["RoundAwareConfig (no labels: MSE to float + reg.)"].append(
                f"{D.accuracy(qr, data.x_test, data.y_test):.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
        for label, cells in rows.items():
            lines.append(f"| {kind} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: label -> (method, extra QATConfig fields)
RELAXED_ROWS = {"STE": ("ste", {}), "LSQ": ("lsq", {}),
                "relaxed (concrete, tau=1)": ("relaxed", {}),
                "relaxed RQ-ST (hard, tau=1)": ("relaxed", {"relaxed_hard": True})}


def relaxed_table(models: dict, data: D.DigitsData, settings=((4, 4), (3, 3), (2, 2)),
                  epochs: int = 3) -> str:
    lines = [f"QAT: {epochs} epochs of SGD (momentum 0.9, lr 5e-3, cosine) from the float "
             "model, converted to qkern's kernels; test accuracy (time)", ""]
    lines += ["| model | method | " + " | ".join(f"W{w}A{a}" for w, a in settings) + " |",
              "|---" * (len(settings) + 2) + "|"]
    for kind, model in models.items():
        for label, (meth, kw) in RELAXED_ROWS.items():
            cells = []
            for w, a in settings:
                t0 = time.perf_counter()
                acc = R.qat(model, data, meth, w, a, epochs=epochs, **kw)
                cells.append(f"{acc:.4f} ({time.perf_counter() - t0:.0f} s)")
            lines.append(f"| {kind} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qkern.tools.reports.calib_extras",
                                 description="EMA ranges, round-aware shaping and relaxed "
                                             "quantization on the digits models.")
    ap.add_argument("--tables", default="ema,round,relaxed",
                    help="comma-separated subset of ema,round,relaxed")
    ap.add_argument("--models", default="mlp,cnn", help="digits models (mlp, cnn)")
    ap.add_argument("--relaxed-models", default="mlp",
                    help="models of the relaxed table (the CNN's activations make it slow)")
    ap.add_argument("--steps", type=int, default=200, help="round-aware fine-tune steps")
    ap.add_argument("--epochs", type=int, default=3, help="QAT epochs of the relaxed table")
    args = ap.parse_args(argv)
    data = D.load_data()
    kinds = set(args.models.split(",")) | set(args.relaxed_models.split(","))
    models = {k: D.train(k, data, epochs=30) for k in ("mlp", "cnn") if k in kinds}
    print("float test accuracy: " + ", ".join(
        f"{k} {D.accuracy(m, data.x_test, data.y_test):.4f}" for k, m in models.items()))
    pick = {k: models[k] for k in args.models.split(",")}
    tables = args.tables.split(",")
    if "ema" in tables:
        print("\n" + ema_table(pick, data), flush=True)
    if "round" in tables:
        print("\n" + round_aware_table(pick, data, steps=args.steps), flush=True)
    if "relaxed" in tables:
        print("\n" + relaxed_table({k: models[k] for k in args.relaxed_models.split(",")},
                                   data, epochs=args.epochs), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
