"""Hardware constraints and log-domain arithmetic on real models (docs/hardware.md).

``python -m qkern.tools.reports.hardware`` prints two tables:

1. the digits MLP and CNN (qkern.models.digits) quantized W8A8 / W4A8 static under a few
   :class:`~qkern.quantization.constraints.HardwareConstraints` sets: test accuracy and
   ``qkern.hardware_cost`` (largest accumulator needed, requantization steps, whether every
   layer fits the accumulator);
2. the log-domain matmul (``qkern.logdomain``) against the float matmul, and linear int4 / int8
   at the same bits, on real weights and their real inputs: the digits MLP's first two layers
   (test images) and one Linear of models/wikitext-bytelm (WikiText-2 test bytes).

With ``--llm`` a third: models/wikitext-bytelm quantized to int4 per channel by RTN and by
GPTQ (act_order) under the same constraint sets (calibration 8 x 128 bytes of WikiText-2 valid;
logit MSE against the float model on 2 x 128 bytes of test, summed over the two; the sum of the
run's per-layer relative output errors).
"""

from __future__ import annotations

import argparse
import warnings

import torch

from ... import quantization as Q
from ...logdomain import log_matmul, log_quantize
from ...models import digits as D
from ...models import load_llama, load_pretrained
from ...models.assets import shipped_path
from ...quantization import text_calibration
from ...quantize import quantize

__all__ = ["LLM_SETS", "SETS", "constraint_table", "llm_table", "log_table", "main"]

HC = Q.HardwareConstraints
SETS: list[tuple[str, str, str, HC | None]] = [
    ("none", "int8", "int8", None),
    ("pow2 + symmetric", "int8", "int8", HC(pow2_scales=True, symmetric=True)),
    ("pow2 + symmetric + per-tensor", "int8", "int8",
     HC(pow2_scales=True, symmetric=True, per_tensor=True)),
    ("symmetric, 16-bit accumulator", "int8", "int8",
     HC(symmetric=True, accumulator_bits=16, input_bits=8)),
    ("symmetric, 16-bit accumulator, l1 projection only", "int8", "int8",
     HC(symmetric=True, accumulator_bits=16, input_bits=8, accumulator_method="l1_project")),
    ("symmetric, 14-bit accumulator", "int8", "int8",
     HC(symmetric=True, accumulator_bits=14, input_bits=8)),
    ("none", "int4", "int4", None),
    ("pow2 + symmetric, 12-bit accumulator", "int4", "int4",
     HC(pow2_scales=True, symmetric=True, accumulator_bits=12, input_bits=4)),
    ("pow2 + symmetric, 12-bit accumulator, l1 projection only", "int4", "int4",
     HC(pow2_scales=True, symmetric=True, accumulator_bits=12, input_bits=4,
        accumulator_method="l1_project")),
]


def constraint_table(kinds=("mlp", "cnn")) -> str:
    data = D.load_data()
    calib = list(data.x_calib.split(64))
    out = ["| model | weights / acts | constraints | accuracy | max acc bits needed | "
           "fits | requant steps |", "|---|---|---|---|---|---|---|"]
    for kind in kinds:
        model = D.train(kind, data)
        out.append(f"| {kind} | float32 | - | "
                   f"{D.accuracy(model, data.x_test, data.y_test):.4f} | - | - | - |")
        for label, wf, af, c in SETS:
            cfg = Q.StaticConfig(fmt=wf, act_fmt=af, group_size=None, act_symmetric=True,
                                 constraints=c)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = Q.quantize_model(model, cfg, calibration=calib)
            acc = D.accuracy(q, data.x_test, data.y_test)
            cost = Q.hardware_cost(q, c, input_bits=int(af[3:]))
            t = cost.totals
            fits = "-" if c is None or c.accumulator_bits is None else str(t["all_fit"])
            out.append(f"| {kind} | W{wf[3:]}A{af[3:]} | {label} | {acc:.4f} | "
                       f"{t['max_acc_bits']} | {fits} | {t['requant_steps']} |")
    return "\n".join(out)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def _linear_int(x: torch.Tensor, w: torch.Tensor, bits: int) -> torch.Tensor:
    """x per row, w per output channel, symmetric int<bits>: the dequantized float64 product
    (what an integer matmul with float rescaling computes)."""
    fmt = f"int{bits}"
    xq = quantize(x, fmt, granularity="channel", axis=0).dequantize().double()
    wq = quantize(w, fmt, granularity="channel", axis=0).dequantize().double()
    return xq @ wq.T


def _operands() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    data = D.load_data()
    mlp = D.train("mlp", data)
    x0 = data.x_test.flatten(1).float()
    with torch.no_grad():
        x1 = torch.relu(mlp[1](x0))
    ops = [("digits MLP fc1 (64 -> 128)", x0, mlp[1].weight.detach()),
           ("digits MLP fc2 (128 -> 64)", x1, mlp[3].weight.detach())]
    lm = load_pretrained(shipped_path("models/wikitext-bytelm")).eval()
    text = shipped_path("data/wikitext-2/wiki.test.tokens").read_bytes()[:1024]
    ids = torch.tensor(list(text), dtype=torch.long).reshape(4, 256)
    name, lin = next((n, m) for n, m in lm.named_modules()
                     if isinstance(m, torch.nn.Linear) and "mlp" in n and "up" in n)
    got = {}
    h = lin.register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0].detach()))
    with torch.no_grad():
        lm(ids)
    h.remove()
    x = got["x"].reshape(-1, got["x"].shape[-1]).float()
    ops.append((f"wikitext-bytelm {name} ({lin.in_features} -> {lin.out_features})", x,
                lin.weight.detach()))
    return ops


def log_table() -> str:
    bases = (2.0, 2**0.5, 2**0.25, 2**0.125, 2**(1 / 16))
    out = ["| layer | bits | linear int | log base 2 | 2^(1/2) | 2^(1/4) | 2^(1/8) | 2^(1/16) |",
           "|---|---|---|---|---|---|---|---|"]
    for label, x, w in _operands():
        ref = x.double() @ w.double().T
        for bits in (4, 8):
            cells = [f"{_rel(_linear_int(x, w, bits), ref):.4f}"]
            for base in bases:
                y = log_matmul(log_quantize(x, bits, base, per_row=True),
                               log_quantize(w, bits, base, per_row=True))
                cells.append(f"{_rel(y, ref):.4f}")
            out.append(f"| {label} | {bits} | " + " | ".join(cells) + " |")
    return "\n".join(out)


LLM_SETS: list[tuple[str, HC | None]] = [
    ("none", None),
    ("pow2 + symmetric", HC(pow2_scales=True, symmetric=True)),
    ("pow2 + symmetric + 16-bit accumulator (8-bit inputs)",
     HC(pow2_scales=True, symmetric=True, accumulator_bits=16, input_bits=8)),
    ("per-tensor + pow2", HC(per_tensor=True, pow2_scales=True)),
]


def llm_table() -> str:
    """RTN vs GPTQ int4 per channel on models/wikitext-bytelm under each of LLM_SETS."""
    model = load_llama(shipped_path("models/wikitext-bytelm"))
    cal = text_calibration(shipped_path("data/wikitext-2/wiki.valid.tokens"), "bytes", 8, 128)
    ids = text_calibration(shipped_path("data/wikitext-2/wiki.test.tokens"), "bytes", 2, 128,
                           seed=4)
    with torch.no_grad():
        ref = [model(i) for i in ids]
    out = ["| constraints | method | sum of layer errors | logit MSE |", "|---|---|--:|--:|"]
    for name, c in LLM_SETS:
        for method, cfg in (("RTN", Q.RTNConfig(bits=4, group_size=None, constraints=c)),
                            ("GPTQ", Q.GPTQConfig(bits=4, group_size=None, act_order=True,
                                                  constraints=c))):
            q = Q.quantize_model(model, cfg, cal, progress=False)
            with torch.no_grad():
                mse = sum(float(((q(i) - r) ** 2).mean()) for i, r in zip(ids, ref))
            err = sum(r.error for r in q.qkern_report)
            out.append(f"| {name} | {method} | {err:.3f} | {mse:.4f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m qkern.tools.reports.hardware",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", action="store_true",
                   help="also RTN vs GPTQ under constraints on models/wikitext-bytelm")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(constraint_table())
    print()
    print("Relative error ||Y - Y_float|| / ||Y_float|| of the matmul (x per row, w per "
          "output channel):")
    print()
    print(log_table())
    if args.llm:
        print()
        print(llm_table())


if __name__ == "__main__":
    main()
