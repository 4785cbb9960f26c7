"""LLM.int8() (Dettmers et al. 2022): vector-wise int8 quantization with mixed-precision
decomposition. No calibration: each Linear becomes a QuantLinear with int8 weights per output
channel (row-wise absmax / 127, as bitsandbytes' vector-wise quantization) on the
``w8a8_mixed`` kernel, which at every call finds the outlier feature dimensions of its input
(columns with any ``|x_ij| >= threshold``), runs the other columns as per-token int8 x int8 ->
int32 (rescaled by the row and column scales) and adds the outlier columns in float against
the same columns of the dequantized int8 weight: the weights stay int8 (ops/w8mixed.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ...nn import QuantLinear
from ...ops.w8mixed import outlier_columns
from ..calibration import as_batches, run_batches
from ..layers import weight_module
from ..registry import (
    BaseConfig,
    Quantizer,
    check_choice,
    config_class,
    fail,
    matches,
    register_quantizer,
)

__all__ = ["LLMInt8Config", "LLMInt8Quantizer", "OutlierReport", "OutlierRow", "outlier_report"]


@config_class
@dataclass
class LLMInt8Config(BaseConfig):
    """``threshold``: the outlier magnitude (the paper's alpha = 6.0, bitsandbytes'
    ``llm_int8_threshold``); 0 computes every column in float, ``math.inf`` none (plain
    per-token W8A8). ``lm_head`` and the embeddings stay float by default (``exclude``), as in
    bitsandbytes."""

    threshold: float = 6.0
    fmt: str = "int8"
    exclude: list[str] = field(default_factory=lambda: ["lm_head", "Embedding"])
    FORMAT_FIELD: ClassVar[str] = "fmt"

    def __post_init__(self) -> None:
        check_choice(type(self).__name__, "fmt", self.fmt, ("int8",))
        t = self.threshold
        if (isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0):
            fail(type(self).__name__, "threshold", "a number >= 0 (inf: no outliers)", t)
        self.threshold = float(t)
        super().__post_init__()


@register_quantizer(LLMInt8Config)
class LLMInt8Quantizer(Quantizer):
    SUPPORTED = (nn.Linear,)

    def convert(self, model: nn.Module) -> None:
        for name, cfg in self.plan:
            mod = model.get_submodule(name)
            self.swap(model, name, lambda: weight_module(mod, "int8", None, {}, name,
                                                         act="int8_mixed",
                                                         threshold=cfg.threshold))


@dataclass
class OutlierRow:
    """One Linear layer: ``channels`` input channels of ``in_features`` held an
    ``|x| >= threshold`` in at least one call (``per_call``: the mean count per call, what the
    float half of ``gemm_w8a8_mixed`` computes each time)."""

    layer: str
    in_features: int
    channels: int
    per_call: float

    @property
    def percent(self) -> float:
        return 100.0 * self.channels / max(self.in_features, 1)


@dataclass
class OutlierReport:
    """:func:`outlier_report`'s result: one row per layer, in execution order."""

    threshold: float
    rows: list[OutlierRow]

    @property
    def channels(self) -> int:
        return sum(r.channels for r in self.rows)

    @property
    def in_features(self) -> int:
        return sum(r.in_features for r in self.rows)

    @property
    def percent(self) -> float:
        return 100.0 * self.channels / max(self.in_features, 1)

    def markdown(self) -> str:
        lines = [f"| layer (threshold {self.threshold:g}) | input channels | outlier channels "
                 "| % | mean per call |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r.layer} | {r.in_features} | {r.channels} | {r.percent:.2f} | "
                  f"{r.per_call:.1f} |" for r in self.rows]
        lines.append(f"| **total** | {self.in_features} | {self.channels} | "
                     f"{self.percent:.2f} | |")
        return "\n".join(lines)


def outlier_report(model: nn.Module, data, threshold: float = 6.0,
                   exclude: tuple[str, ...] = ("lm_head",)) -> OutlierReport:
    """How many input channels of each Linear layer of ``model`` (float ``nn.Linear`` or
    ``QuantLinear``; names matching ``exclude`` skipped) LLM.int8 would keep in 16-bit on
    ``data`` (an iterable of model inputs): the columns of the layer's input, flattened to
    (tokens, in_features), with any ``|x| >= threshold`` (``qkern.ops.w8mixed``'s
    ``outlier_columns``, the rule the ``w8a8_mixed`` kernel applies at every call).

    >>> import torch
    >>> model = nn.Sequential(nn.Linear(4, 3))
    >>> x = torch.tensor([[0.5, 7.0, -9.0, 1.0], [0.1, 0.2, 0.3, 0.4]])
    >>> r = outlier_report(model, [x], threshold=6.0)
    >>> r.rows[0].channels, r.rows[0].percent
    (2, 50.0)
    """
    t = threshold
    if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0:
        raise ValueError(f"outlier_report: threshold must be a number >= 0, got {t!r}")
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, QuantLinear)) and not matches(n, m, exclude)]
    if not layers:
        raise ValueError(f"outlier_report: {type(model).__name__} has no Linear layer")
    seen: dict[str, torch.Tensor] = {}
    calls: dict[str, list[int]] = {}

    def hook(name: str):
        def pre(mod, args):
            x = args[0].detach().float()
            cols = outlier_columns(x.reshape(-1, x.shape[-1]), float(t))
            mask = seen.setdefault(name, torch.zeros(x.shape[-1], dtype=torch.bool))
            mask[cols] = True
            calls.setdefault(name, []).append(int(cols.numel()))
        return pre

    run_batches(model, as_batches(data), {n: (hook(n), None) for n, _ in layers})
    rows = [OutlierRow(n, m.in_features, int(seen[n].sum()), sum(calls[n]) / len(calls[n]))
            for n, m in layers if n in seen]
    order = list(seen)  # first-call order = execution order
    rows.sort(key=lambda r: order.index(r.layer))
    return OutlierReport(float(t), rows)
