"""Integer-only inference (IntegerOnlyConfig) against qkern's float-scale static W8A8.

``python -m qkern.tools.reports.integer_only [--minilm] [--n 128]`` prints the Markdown tables
of docs/integer_only.md:

- digits MLP / CNN (qkern.models.digits, trained deterministically, 256 training images
  calibrate): test accuracy of the float model, of ``StaticConfig()`` (W8A8: int8 per-channel
  weights, symmetric int8 activations per tensor, float rescale of the int32 accumulator) and
  of the integer-only network (int8 in, int8 out, fixed-point requantization, no float op);
- with ``--minilm``: all-MiniLM-L6-v2's 36 encoder Linear layers, each an integer-only matmul
  with float boundaries (``mode="layers"``, the model stays float around them): sentence
  embedding cosine vs fp32 on WikiText-2 test sentences, next to static W8A8, with int16 (the
  default) and int8 output codes;
- with ``--per-layer``: each MiniLM layer's relative output error with int8 output codes, with
  its int8 input alone (the int32 accumulator rescaled in float) and with int16 output codes
  (docs/integer_only.md, "Where int8 outputs lost").
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

from ... import quantize_model
from ...models import digits as D
from ...models.bert import embed, load_minilm
from ...nn.integer import IntegerLinearIO, IntegerModel
from ...quantization import IntegerOnlyConfig, StaticConfig
from .minilm import calibration, sentences

__all__ = ["DIGITS_SCHEMES", "digits_rows", "minilm_rows", "per_layer_rows", "run"]

DIGITS_SCHEMES = [
    ("W8A8 static (float rescale)", StaticConfig()),
    ("integer-only, asymmetric int8 acts", IntegerOnlyConfig()),
    ("integer-only, symmetric int8 acts", IntegerOnlyConfig(act_symmetric=True)),
    ("integer-only, per-tensor weights", IntegerOnlyConfig(per_channel=False)),
]


def _quiet(model, cfg, calib):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_model(model, cfg, calibration=calib)


def digits_rows(kinds=("mlp", "cnn")) -> list[tuple[str, str, float]]:
    """(model, scheme, test accuracy) rows; the integer-only ones run ``IntegerModel``: the
    test images quantized at the boundary, the network on int8 codes, the logits' codes
    compared (argmax of the int8 logits = argmax of their dequantized values)."""
    data = D.load_data()
    calib = list(data.x_calib.split(64))
    rows = []
    for kind in kinds:
        model = D.train(kind, data)
        rows.append((kind, "float32", D.accuracy(model, data.x_test, data.y_test)))
        for name, cfg in DIGITS_SCHEMES:
            q = _quiet(model, cfg, calib)
            if isinstance(cfg, IntegerOnlyConfig):
                im = IntegerModel(q)
                with torch.no_grad():
                    pred = im(im.quantize(data.x_test)).argmax(-1)
                acc = float((pred == data.y_test).float().mean())
            else:
                acc = D.accuracy(q, data.x_test, data.y_test)
            rows.append((kind, name, acc))
    return rows


def minilm_rows(n: int = 128, n_calib: int = 64) -> list[tuple[str, float, float]]:
    """(scheme, mean cosine, min cosine) of MiniLM sentence embeddings vs fp32."""
    model = load_minilm()
    sents = sentences(n, "test")
    calib = calibration(n_calib)
    ref = embed(model, sents)
    rows = [("fp32", 1.0, 1.0)]
    for name, cfg in [("W8A8 static (float rescale)", StaticConfig(include=["Linear"])),
                      ("integer-only Linear layers (mode='layers'), int16 outputs",
                       IntegerOnlyConfig(include=["Linear"], mode="layers")),
                      ("integer-only Linear layers (mode='layers'), int8 outputs",
                       IntegerOnlyConfig(include=["Linear"], mode="layers", layers_out_bits=8))]:
        cos = (embed(_quiet(model, cfg, calib), sents) * ref).sum(-1)
        rows.append((name, float(cos.mean()), float(cos.min())))
    return rows


def _acc_float(io: IntegerLinearIO, x: torch.Tensor) -> torch.Tensor:
    """The layer's int32 accumulator on the int8 input codes, rescaled in float64 (what the
    output would be without its rounding to output codes)."""
    lay = io.layer
    xq = io.quant_in.quantize(x).reshape(-1, lay.w_q.shape[1]).to(torch.int32) - lay.in_zp
    acc = torch.mm(xq, lay.w_q.to(torch.int32).t()) + lay.bias_q
    m = lay.m0.double() * 2.0 ** (lay.shift.double() - 31)
    return (acc.double() * m * lay.out_scale).reshape(*x.shape[:-1], -1).float()


@torch.no_grad()
def per_layer_rows(n: int = 32, n_calib: int = 64) -> list[tuple[str, float, float, float]]:
    """(layer, relative error with int8 outputs, with the int8 input alone, with int16 outputs):
    MiniLM with every Linear integer-only (int8 outputs); each layer's error
    ``||y - f(x)|| / ||f(x)||`` against its fp32 layer ``f`` on the same input ``x``, mean over
    the batches of ``n`` test sentences."""
    model = load_minilm()
    calib = calibration(n_calib)
    cfg = dict(include=["Linear"], mode="layers")
    q8 = _quiet(copy.deepcopy(model), IntegerOnlyConfig(**cfg, layers_out_bits=8), calib)
    q16 = _quiet(copy.deepcopy(model), IntegerOnlyConfig(**cfg), calib)
    errs: dict[str, list] = {}

    def hook(name):
        ref, wide = model.get_submodule(name), q16.get_submodule(name)

        def h(mod, args, y):
            x = args[0]
            yf = ref(x)
            e = [float((v - yf).norm() / yf.norm()) for v in (y, _acc_float(mod, x), wide(x))]
            errs.setdefault(name, []).append(e)
        return h

    hs = [m.register_forward_hook(hook(k)) for k, m in q8.named_modules()
          if isinstance(m, IntegerLinearIO)]
    embed(q8, sentences(n, "test"))
    for h in hs:
        h.remove()
    return [(k, *torch.tensor(v).mean(0).tolist()) for k, v in errs.items()]


def run(minilm: bool = False, n: int = 128, per_layer: bool = False) -> str:
    data = D.load_data()
    out = [f"Digits ({len(data.y_test)} held-out images; 256 training images calibrate)", "",
           "| model | scheme | test accuracy |", "|---|---|--:|"]
    out += [f"| {k} | {s} | {100 * a:.2f} % |" for k, s, a in digits_rows()]
    if minilm:
        out += ["", f"all-MiniLM-L6-v2, {n} WikiText-2 test sentences (64 valid sentences "
                "calibrate)", "", "| scheme | mean cosine vs fp32 | min cosine |", "|---|--:|--:|"]
        out += [f"| {s} | {c:.5f} | {m:.5f} |" for s, c, m in minilm_rows(n)]
    if per_layer:
        out += ["", "MiniLM per layer, relative output error (32 WikiText-2 test sentences)", "",
                "| layer | int8 out | int8 input only | int16 out |", "|---|--:|--:|--:|"]
        out += [f"| {k} | {a:.4f} | {b:.4f} | {c:.4f} |" for k, a, b, c in per_layer_rows()]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m qkern.tools.reports.integer_only",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minilm", action="store_true", help="also the MiniLM table")
    ap.add_argument("--n", type=int, default=128, help="MiniLM evaluation sentences")
    ap.add_argument("--per-layer", action="store_true", help="also MiniLM's per-layer errors")
    a = ap.parse_args(argv)
    print(run(a.minilm, a.n, a.per_layer))


if __name__ == "__main__":
    main()
