"""QAT accuracy on real images: the digits CNN (qkern.models.digits) trained in float, then
fine-tuned with each QAT method at W4A4 and W2A2 from the same float checkpoint and seed,
converted to qkern's kernels, and scored on the held-out split beside PTQ (StaticConfig, MSE
observer) at the same bits; then the ternary / power-of-two methods (TTQ, INQ) weight-only and
with 4-bit activations; then the 1-bit rows (:func:`binary_table`): BinaryConnect and ABC-Net
on the same CNN beside PTQ binary weights, XNOR-Net (binary weights and activations) on the
``cnn_bn`` model (BatchNorm before each binarized layer, first and last layers float, as the
paper). ``python -m qkern.tools.reports.qat`` prints the tables."""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

from ... import quantization as Q
from ...models import digits as D

__all__ = ["BINARY_ROWS", "LOW_BIT", "METHODS", "SETTINGS", "TTQ_LR_SCALE", "binary_table",
           "ptq", "ptq_binary", "qat", "table"]

METHODS = ("ste", "lsq", "lsq+", "pact", "dorefa")
#: label -> (weight bits, activation bits)
SETTINGS = {"W4A4": (4, 4), "W2A2": (2, 2)}
#: TTQ's W_p / W_n gradients are sums over a layer's region: their learning rate is scaled
TTQ_LR_SCALE = {"w_p": 1e-2, "w_n": 1e-2}
#: the second table: (method, weight bits, label), weight-only and with 4-bit activations
LOW_BIT = (("ttq", 2, "TTQ (ternary)"), ("inq", 3, "INQ 3-bit (log2_3)"),
           ("inq", 5, "INQ 5-bit (log2_5)"))


def ptq(model: torch.nn.Module, data: D.DigitsData, bits: int) -> float:
    """PTQ at the same bits: int weights per channel, unsigned activations, MSE ranges."""
    cfg = Q.StaticConfig(fmt=f"int{bits}", act_fmt=f"uint{bits}", act_symmetric=False,
                         observer="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = Q.quantize_model(model, cfg, [data.x_calib])
    return D.accuracy(q, data.x_test, data.y_test)


#: label -> (model kind, QATConfig keyword arguments) of the 1-bit rows
BINARY_ROWS = {
    "QAT binaryconnect W1 (cnn_bn, float activations)": ("cnn_bn",
                                                           {"method": "binaryconnect"}),
    "QAT abc W1 M=3 (float activations)": ("cnn", {"method": "abc"}),
    "QAT abc W1 M=3 A1 N=3": ("cnn", {"method": "abc", "activation": 1}),
    "QAT xnor W1A1 (cnn_bn, first / last float)": (
        "cnn_bn", {"method": "xnor", "activation": 1, "exclude": ["0", "11"]}),
}


def ptq_binary(model: torch.nn.Module) -> torch.nn.Module:
    """PTQ binary weights: WeightOnlyConfig(fmt="binary"), mean |w| per output channel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Q.quantize_model(model, Q.WeightOnlyConfig(fmt="binary", group_size=None))


def qat(model: torch.nn.Module, data: D.DigitsData, method: str, w_bits: int,
        a_bits: int | None, epochs: int = 6, lr: float = 5e-3, **kw) -> float:
    """Fine-tunes a prepared copy of ``model`` (:func:`qkern.models.digits.finetune`),
    converts it and returns the converted model's test accuracy (``kw``: more QATConfig
    fields). INQ: ``epochs`` split over the three retraining phases after 50 / 75 / 87.5 %
    (then the last step to 100 %)."""
    torch.manual_seed(0)
    m = Q.prepare(copy.deepcopy(model), Q.QATConfig(weight=w_bits, activation=a_bits,
                                                    method=method, **kw), inplace=True)
    if method == "inq":
        for _ in range(3):
            Q.inq_step(m)
            D.finetune(m, data, epochs=max(epochs // 3, 1), lr=lr)
        Q.inq_step(m)
    else:
        D.finetune(m, data, epochs=epochs, lr=lr, extra_loss=Q.qat_regularization,
                   lr_scale=TTQ_LR_SCALE if method == "ttq" else None,
                   after_step=Q.clip_latent_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-channel conv weights on the dequant path
        q = Q.convert(m)
    return D.accuracy(q, data.x_test, data.y_test)


def table(methods=METHODS, settings=tuple(SETTINGS), epochs: int = 6,
          float_epochs: int = 30) -> str:
    data = D.load_data()
    model = D.train("cnn", data, epochs=float_epochs)
    base = D.accuracy(model, data.x_test, data.y_test)
    head = "| method | " + " | ".join(settings) + " |"
    lines = [f"digits CNN: float {base:.4f} test accuracy ({len(data.y_test)} images); QAT: "
             f"{epochs} epochs of SGD (momentum 0.9, lr 5e-3, cosine) from the float model, "
             "then converted to qkern's kernels; PTQ: StaticConfig, MSE observer", "",
             head, "|---" * (len(settings) + 1) + "|"]
    lines.append("| PTQ | " + " | ".join(f"{ptq(model, data, SETTINGS[s][0]):.4f}"
                                         for s in settings) + " |")
    for meth in methods:
        cells = []
        for s in settings:
            t0 = time.perf_counter()
            acc = qat(model, data, meth, *SETTINGS[s], epochs=epochs)
            cells.append(f"{acc:.4f} ({time.perf_counter() - t0:.0f} s)")
        lines.append(f"| QAT {meth} | " + " | ".join(cells) + " |")
    lines += ["", "| method | weight-only | A4 |", "|---|---|---|"]
    for meth, bits, label in LOW_BIT:
        cells = []
        for a in (None, 4):
            t0 = time.perf_counter()
            acc = qat(model, data, meth, bits, a, epochs=epochs)
            cells.append(f"{acc:.4f} ({time.perf_counter() - t0:.0f} s)")
        lines.append(f"| QAT {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def binary_table(epochs: int = 6, float_epochs: int = 30, data=None) -> str:
    data = data or D.load_data()
    models = {k: D.train(k, data, epochs=float_epochs) for k in ("cnn", "cnn_bn")}
    acc = {k: D.accuracy(m, data.x_test, data.y_test) for k, m in models.items()}
    lines = [f"1-bit: float cnn {acc['cnn']:.4f}, float cnn_bn {acc['cnn_bn']:.4f}; QAT "
             f"{epochs} epochs as above, converted to the binary kernels", "",
             "| row | accuracy |", "|---|---|",
             f"| PTQ binary weights (cnn) | "
             f"{D.accuracy(ptq_binary(models['cnn']), data.x_test, data.y_test):.4f} |",
             f"| PTQ binary weights (cnn_bn) | "
             f"{D.accuracy(ptq_binary(models['cnn_bn']), data.x_test, data.y_test):.4f} |"]
    for label, (kind, kw) in BINARY_ROWS.items():
        kw = dict(kw)
        t0 = time.perf_counter()
        a = qat(models[kind], data, kw.pop("method"), 1, kw.pop("activation", None),
                epochs=epochs, **kw)
        lines.append(f"| {label} | {a:.4f} ({time.perf_counter() - t0:.0f} s) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qkern.tools.reports.qat",
                                 description="QAT vs PTQ accuracy of the digits CNN.")
    ap.add_argument("--epochs", type=int, default=6, help="QAT fine-tuning epochs (default 6)")
    ap.add_argument("--binary-only", action="store_true", help="only the 1-bit rows")
    args = ap.parse_args(argv)
    if not args.binary_only:
        print(table(epochs=args.epochs))
        print()
    print(binary_table(epochs=args.epochs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
