"""Empirical bias correction (Nagel et al. 2019, AIMET's empirical variant): the mean output
error E[y_q - y_float] of each quantized layer on calibration data, per output channel,
subtracted from its bias, layer by layer in execution order. ``bias_correction=True`` on
WeightOnlyConfig / StaticConfig runs it at convert time."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ...nn import QuantConv1d, QuantConv2d, QuantLinear
from ..calibration import FLOAT_LAYERS, as_batches, execution_order, run_batches
from ..layers import ActQuant

__all__ = ["bias_correction"]


def _float_twin(float_model: nn.Module, name: str) -> nn.Module | None:
    try:
        m = float_model.get_submodule(name)
    except AttributeError:
        return None
    return m if type(m) in FLOAT_LAYERS else None


def _quantized_layers(qmodel: nn.Module) -> list[str]:
    """Outermost quantized Linear / Conv layers (QuantLinear, QuantConv*, or an ActQuant or
    other wrapper holding one) by name."""
    out = []
    for name, m in qmodel.named_modules():
        if not name or any(name.startswith(o + ".") for o in out):
            continue
        if isinstance(m, (QuantLinear, QuantConv1d, QuantConv2d, ActQuant)):
            out.append(name)
    return out


def _bias_owner(m: nn.Module) -> QuantLinear:
    while isinstance(m, ActQuant):
        m = m.module
    if isinstance(m, (QuantConv1d, QuantConv2d)):
        m = m.qlinear
    if not isinstance(m, QuantLinear):
        raise ValueError(f"bias correction does not know where the bias of a "
                         f"{type(m).__name__} lives")
    return m


class _ChannelMean:
    def __init__(self, linear: bool):
        self.linear, self.sum, self.n = linear, None, 0

    def __call__(self, module, args, out):
        y = out.detach().double()
        y = y.reshape(-1, y.shape[-1]) if self.linear else y.transpose(0, 1).reshape(
            y.shape[1], -1).T
        s = y.sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.n += y.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        if self.sum is None:
            raise ValueError("the layer did not run on the calibration data")
        return self.sum / self.n


def bias_correction(float_model: nn.Module, qmodel: nn.Module, calibration: Iterable,
                    layers: Iterable[str] | None = None, sequential: bool = True
                    ) -> dict[str, torch.Tensor]:
    """Empirical bias correction, in place on ``qmodel``: for each quantized Linear / Conv
    (``layers``: their names; default every quantized layer whose float twin in
    ``float_model`` has the same name), the per-output-channel mean of
    ``y_quantized - y_float`` over the calibration data is subtracted from its bias (a bias is
    created when the layer has none). ``sequential=True`` corrects one layer at a time in
    execution order, each measured after the corrections before it (one pass over the data
    per layer); False measures every layer in one pass. Returns {name: the correction
    subtracted}."""
    batches = as_batches(calibration)
    names = _quantized_layers(qmodel) if layers is None else list(layers)
    names = [n for n in names if _float_twin(float_model, n) is not None]
    if not names:
        return {}
    ref = {n: _ChannelMean(isinstance(_float_twin(float_model, n), nn.Linear)) for n in names}
    run_batches(float_model, batches, {n: (None, h) for n, h in ref.items()})
    order = execution_order(qmodel, names, batches)
    groups = [[n] for n in order] if sequential else [order]
    done = {}
    for group in groups:
        got = {n: _ChannelMean(ref[n].linear) for n in group}
        run_batches(qmodel, batches, {n: (None, h) for n, h in got.items()})
        for n in group:
            try:
                diff = (got[n].mean - ref[n].mean).float()
            except ValueError:
                raise ValueError(f"{n}: the layer did not run on the calibration data"
                                 ) from None
            owner = _bias_owner(qmodel.get_submodule(n))
            b = torch.zeros_like(diff) if owner.bias is None else owner.bias.detach().float()
            owner.bias = nn.Parameter(b - diff, requires_grad=False)
            done[n] = diff
    return done
