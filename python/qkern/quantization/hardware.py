"""What a model costs on integer hardware: :func:`hardware_cost` (``qkern.hardware_cost``).

Per weight layer (Linear / Conv, float or quantized by qkern): bits of weights and of input
activations, the exact worst-case ``|sum_i w_i x_i|`` over every integer input of
``input_bits`` (the sign-aligned input, ``constraints.worst_case_accumulator``) and the
accumulator width it needs (``bit_length(max) + 1``: a signed register holding ``[-m, m]``),
and the requantization steps: how many times per output element an integer accumulator is
rescaled (1 for per-channel / per-tensor scales, K / g for groups of g, whose partial sums are
scaled one by one) plus one for quantizing the layer's input (static or dynamic).
A float layer is costed as it would be quantized under ``constraints`` to ``weight_fmt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .. import formats as QF
from ..nn import QuantConv1d, QuantConv2d, QuantLinear
from .constraints import (
    HardwareConstraints,
    accumulator_bits_needed,
    constrained_weight,
    worst_case_accumulator,
)
from .layers import ActQuant

__all__ = ["HardwareCost", "hardware_cost"]

_FLOAT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class HardwareCost:
    """Rows (one dict per layer) and totals of :func:`hardware_cost`."""

    rows: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)

    def markdown(self) -> str:
        cols = ["layer", "weight_bits", "act_bits", "K", "max_l1", "worst_acc", "acc_bits",
                "fits", "requant_steps"]
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            out.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
        return "\n".join(out)


def _int_weight(ql: QuantLinear):
    """(integer weights (out, K) int64 or None, bits, group size or None) of a QuantLinear."""
    q = ql.quantized_weight()
    f = q.format
    if f.kind != "int":
        return None, f.bits, q.group_size
    codes = q.codes.to(torch.int64)
    if q.zero_point is not None:
        if q.zero_point.is_floating_point():
            return None, f.bits, q.group_size
        zp = q.zero_point.to(torch.int64)
        if q.group_size is not None:
            zp = zp.reshape(codes.shape[0], -1).repeat_interleave(q.group_size, 1)
        else:
            zp = zp.reshape(-1, 1) if zp.numel() > 1 else zp.reshape(1, 1)
        codes = codes - zp
    return codes, f.bits, q.group_size


def _act_bits(ql: QuantLinear, wrapper) -> int:
    if isinstance(wrapper, ActQuant):
        return QF.get(wrapper.fmt).bits
    if ql.act != "none" or ql.mode == "fast":
        return 8
    return 32


def hardware_cost(model: nn.Module, constraints: HardwareConstraints | None = None,
                  input_bits: int | None = None, weight_fmt: str = "int8") -> HardwareCost:
    """Per-layer hardware cost of ``model`` (float or quantized); see the module docstring.

    ``input_bits`` (default: ``constraints.input_bits``, else 8) and
    ``constraints.input_signed`` (default signed) define the integer inputs of the worst case.

    >>> import torch, qkern
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> c = qkern.HardwareConstraints(accumulator_bits=16, input_bits=8)
    >>> cost = qkern.hardware_cost(m, c)
    >>> cost.rows[0]["acc_bits"] <= 16
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"hardware_cost expects an nn.Module, got {type(model).__name__}")
    c = HardwareConstraints.coerce(constraints)
    if input_bits is None:
        input_bits = c.input_bits if c is not None else 8
    probe = HardwareConstraints(input_bits=input_bits,
                                input_signed=True if c is None else c.input_signed)
    lo, hi = probe.input_range()
    cost = HardwareCost()
    seen: set[int] = set()
    for name, mod in model.named_modules():
        wrapper = mod if isinstance(mod, ActQuant) else None
        inner = mod.module if wrapper is not None else mod
        if isinstance(inner, (QuantConv1d, QuantConv2d)):
            inner = inner.qlinear
        if id(inner) in seen:
            continue
        if isinstance(inner, QuantLinear):
            seen.add(id(inner))
            q, wbits, group = _int_weight(inner)
            abits = _act_bits(inner, wrapper)
        elif isinstance(inner, _FLOAT_LAYERS) and wrapper is None:
            w = inner.weight.detach().float()
            _, _, q = constrained_weight(w.reshape(w.shape[0], -1), weight_fmt,
                                         c or HardwareConstraints(), name)
            wbits, group, abits = QF.get(weight_fmt).bits, None, input_bits
        else:
            continue
        k = inner.in_features if isinstance(inner, QuantLinear) else inner.weight[0].numel()
        row = {"layer": name, "weight_bits": wbits, "act_bits": abits, "K": k}
        if q is not None:
            worst = int(worst_case_accumulator(q, lo, hi).max())
            row.update(max_l1=int(q.abs().sum(1).max()), worst_acc=worst,
                       acc_bits=accumulator_bits_needed(worst))
        else:
            row.update(max_l1="-", worst_acc="-", acc_bits="float")
        bound = c.accumulator_bits if c is not None else None
        row["fits"] = ("-" if bound is None or q is None else row["acc_bits"] <= bound)
        rescales = 1 if group is None else k // group
        row["requant_steps"] = rescales + (1 if abits < 32 else 0)
        row["weight_count"] = int(k * (inner.out_features if isinstance(inner, QuantLinear)
                                       else inner.weight.shape[0]))
        cost.rows.append(row)
    ints = [r["acc_bits"] for r in cost.rows if isinstance(r["acc_bits"], int)]
    cost.totals = {
        "layers": len(cost.rows),
        "weight_bits_total": sum(r["weight_bits"] * r["weight_count"] for r in cost.rows),
        "max_acc_bits": max(ints) if ints else None,
        "requant_steps": sum(r["requant_steps"] for r in cost.rows),
        "all_fit": all(r["fits"] is not False for r in cost.rows),
    }
    return cost
