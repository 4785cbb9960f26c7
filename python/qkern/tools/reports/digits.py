"""PTQ accuracy on real images: an MLP and a CNN trained on sklearn's ``load_digits``
(qkern.models.digits), quantized by every workflow config, accuracy on the held-out split
against the float model. ``python -m qkern.tools.reports.digits`` prints the table.

Calibration uses 256 training images (never test images); the float models are trained
deterministically (seed 0), so the table is reproducible on a given torch build.
"""

from __future__ import annotations

import time
import warnings

import torch

from ... import quantization as Q
from ...models import digits as D
from ...nn import QuantLinear

__all__ = ["CONFIGS", "run"]

CONFIGS: list[tuple[str, Q.BaseConfig]] = [
    ("W8A8 static (minmax)", Q.StaticConfig()),
    ("W8A8 static (histogram)", Q.StaticConfig(observer="histogram")),
    ("W8A8 dynamic (per token)", Q.DynamicConfig()),
    ("W4 weight-only (per channel)", Q.WeightOnlyConfig(fmt="int4", group_size=None)),
    ("W4 weight-only (g32)", Q.WeightOnlyConfig(fmt="int4", group_size=32)),
    ("A8 activation-only (uint8)", Q.ActivationOnlyConfig(act_fmt="uint8")),
]


def _kernels(model: torch.nn.Module) -> str:
    ks = sorted({m.kernel for m in model.modules() if isinstance(m, QuantLinear)})
    return ", ".join(ks) if ks else "float weights"


def evaluate(kinds=("mlp", "cnn"), configs=CONFIGS, data: D.DigitsData | None = None,
             models: dict[str, torch.nn.Module] | None = None) -> list[dict]:
    """One dict per (model, scheme): accuracy, its change vs float, seconds, kernels.
    ``models``: already trained float models by kind (else trained here)."""
    data = data or D.load_data()
    calib = list(data.x_calib.split(64))
    rows = []
    for kind in kinds:
        model = (models or {}).get(kind) or D.train(kind, data)
        base = D.accuracy(model, data.x_test, data.y_test)
        rows.append({"model": kind, "scheme": "float32", "acc": base, "delta": 0.0,
                     "seconds": 0.0, "kernels": "-"})
        for name, cfg in configs:
            t0 = time.perf_counter()
            with warnings.catch_warnings():  # per-channel fallbacks are reported by kernels
                warnings.simplefilter("ignore")
                q = Q.quantize_model(model, cfg, calibration=calib)
            secs = time.perf_counter() - t0
            acc = D.accuracy(q, data.x_test, data.y_test)
            rows.append({"model": kind, "scheme": name, "acc": acc, "delta": acc - base,
                         "seconds": secs, "kernels": _kernels(q)})
    return rows


def format_table(rows: list[dict], n_test: int) -> str:
    lines = [f"Digits (sklearn load_digits, {n_test} held-out images; calibration: 256 "
             "training images)", "",
             "| model | scheme | accuracy | vs float | quantize s | kernels |",
             "|---|---|--:|--:|--:|---|"]
    for r in rows:
        delta = "" if r["scheme"] == "float32" else f"{100 * r['delta']:+.2f} pt"
        secs = "" if r["scheme"] == "float32" else f"{r['seconds']:.2f}"
        lines.append(f"| {r['model']} | {r['scheme']} | {100 * r['acc']:.2f} % | {delta} | "
                     f"{secs} | {r['kernels']} |")
    return "\n".join(lines)


def run() -> str:
    data = D.load_data()
    return format_table(evaluate(data=data), len(data.y_test))


if __name__ == "__main__":
    print(run())
