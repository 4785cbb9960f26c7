"""Integer-only inference (IntegerOnlyConfig) against qkern's float-scale static W8A8.

``python -m qkern.tools.reports.integer_only [--minilm] [--n 128]`` prints the Markdown tables
of docs/integer_only.md:

- digits MLP / CNN (qkern.models.digits, trained deterministically, 256 training images
  calibrate): test accuracy of the float model, of ``StaticConfig()`` (W8A8: int8 per-channel
  weights, symmetric int8 activations per tensor, float rescale of the int32 accumulator) and
  of the integer-only network (int8 in, int8 out, fixed-point requantization, no float op);
- with ``--minilm``: all-MiniLM-L6-v2's 36 encoder Linear layers, each an integer-only matmul
  with float boundaries (``mode="layers"``, the model stays float around them): sentence
  embedding cosine vs fp32 on WikiText-2 test sentences, next to static W8A8.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from ... import quantize_model
from ...models import digits as D
from ...models.bert import embed, load_minilm
from ...nn.integer import IntegerModel
from ...quantization import IntegerOnlyConfig, StaticConfig
from .minilm import calibration, sentences

__all__ = ["DIGITS_SCHEMES", "digits_rows", "minilm_rows", "run"]

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
                      ("integer-only Linear layers (mode='layers')",
                       IntegerOnlyConfig(include=["Linear"], mode="layers"))]:
        cos = (embed(_quiet(model, cfg, calib), sents) * ref).sum(-1)
        rows.append((name, float(cos.mean()), float(cos.min())))
    return rows


def run(minilm: bool = False, n: int = 128) -> str:
    data = D.load_data()
    out = [f"Digits ({len(data.y_test)} held-out images; 256 training images calibrate)", "",
           "| model | scheme | test accuracy |", "|---|---|--:|"]
    out += [f"| {k} | {s} | {100 * a:.2f} % |" for k, s, a in digits_rows()]
    if minilm:
        out += ["", f"all-MiniLM-L6-v2, {n} WikiText-2 test sentences (64 valid sentences "
                "calibrate)", "", "| scheme | mean cosine vs fp32 | min cosine |", "|---|--:|--:|"]
        out += [f"| {s} | {c:.5f} | {m:.5f} |" for s, c, m in minilm_rows(n)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m qkern.tools.reports.integer_only",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minilm", action="store_true", help="also the MiniLM table")
    ap.add_argument("--n", type=int, default=128, help="MiniLM evaluation sentences")
    a = ap.parse_args(argv)
    print(run(a.minilm, a.n))


if __name__ == "__main__":
    main()
