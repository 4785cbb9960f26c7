"""Cross-layer equalization (Nagel et al. 2019, data-free) and the layer pairs it (and
SmoothQuant) rescale.

For a pair layer1 -> (ReLU / identity) -> layer2, output channel i of layer1 is divided by
``s_i = sqrt(r1_i / r2_i)`` and input channel i of layer2 multiplied by it, where ``r1_i``
and ``r2_i`` are the ranges (max |w|) of those channels; both then have the range
``sqrt(r1_i * r2_i)``. Exact in float because ReLU(x / s) = ReLU(x) / s for s > 0.

Pairs are found among the direct children of ``nn.Sequential`` containers only: a Linear /
Conv (groups=1), then any of ReLU, LeakyReLU, Identity, Dropout, MaxPool, AvgPool (and one
Flatten when a conv feeds a Linear), then a Linear / Conv of matching channels. Layers joined
by code in a ``forward`` (residuals, attention, norms) are not paired.

``cross_layer_equalization=True`` on WeightOnlyConfig / StaticConfig / AdaRoundConfig runs
:func:`equalize` at prepare time.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..calibration import FLOAT_LAYERS
from ..registry import BaseConfig

__all__ = ["column_view", "cross_layer_equalization", "equalize", "layer_pairs",
           "rescale_pair"]

# modules f with f(x * s) = f(x) * s for a positive per-channel s (channel dim kept)
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


def layer_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer1, layer2) names joined only by positively homogeneous modules inside one
    ``nn.Sequential`` (see the module docstring)."""
    pairs = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.named_children())
        for i, (n1, m1) in enumerate(kids):
            if type(m1) not in FLOAT_LAYERS or getattr(m1, "groups", 1) != 1:
                continue
            flattened = False
            for n2, m2 in kids[i + 1:]:
                if type(m2) in _HOMOGENEOUS:
                    continue
                if type(m2) is nn.Flatten and not flattened and m2.start_dim == 1 and \
                        m2.end_dim == -1 and type(m1) is not nn.Linear:
                    flattened = True
                    continue
                if _fits(m1, m2, flattened):
                    full = (prefix + "." if prefix else "")
                    pairs.append((full + n1, full + n2))
                break
    return pairs


def _fits(m1: nn.Module, m2: nn.Module, flattened: bool) -> bool:
    c = m1.weight.shape[0]
    if type(m2) is nn.Linear:
        if type(m1) is nn.Linear:
            return not flattened and m2.in_features == c
        return flattened and m2.in_features % c == 0
    if type(m2) in (nn.Conv1d, nn.Conv2d):
        return (not flattened and type(m2) is type(m1) and m2.groups == 1
                and m2.in_channels == c)
    return False


def column_view(m2: nn.Module, c: int) -> torch.Tensor:
    """layer2's weight as (out, c, k): input channel i of the pair is w[:, i, :]."""
    return m2.weight.detach().reshape(m2.weight.shape[0], c, -1)


@torch.no_grad()
def rescale_pair(m1: nn.Module, m2: nn.Module, s: torch.Tensor) -> None:
    """layer1 output channel i divided by s_i (weight row and bias), layer2 input channel i
    multiplied by s_i: the float function of layer2(f(layer1(x))) is unchanged."""
    c = m1.weight.shape[0]
    s = s.to(m1.weight.dtype)
    m1.weight.div_(s.view(c, *([1] * (m1.weight.dim() - 1))))
    if m1.bias is not None:
        m1.bias.div_(s)
    w2 = m2.weight.view(m2.weight.shape[0], c, -1)
    w2.mul_(s.view(1, c, 1).to(w2.dtype))


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    ok = (num > 0) & (den > 0)
    s = torch.where(ok, num / torch.where(ok, den, 1.0), 1.0)
    return s.clamp(1e-8, 1e8)


def cross_layer_equalization(model: nn.Module, inplace: bool = False, iterations: int = 20,
                             pairs: list[tuple[str, str]] | None = None) -> nn.Module:
    """Equalizes the per-channel weight ranges of every layer pair (``layer_pairs``), sweeping
    the pairs until the scales settle (at most ``iterations`` sweeps). The float function is
    unchanged; per-tensor weight quantization then loses much less on the small channels.
    Works on a copy unless ``inplace=True``."""
    target = model if inplace else copy.deepcopy(model)
    pairs = layer_pairs(target) if pairs is None else pairs
    for _ in range(iterations):
        worst = 0.0
        for n1, n2 in pairs:
            m1, m2 = target.get_submodule(n1), target.get_submodule(n2)
            c = m1.weight.shape[0]
            r1 = m1.weight.detach().reshape(c, -1).abs().amax(1).double()
            r2 = column_view(m2, c).abs().amax(dim=(0, 2)).double()
            s = _safe_ratio(r1, r2).sqrt()
            rescale_pair(m1, m2, s.float())
            worst = max(worst, float(s.log().abs().max()) if s.numel() else 0.0)
        if worst < 1e-4:
            break
    return target


def equalize(model: nn.Module, cfg: BaseConfig) -> None:
    """The ``cross_layer_equalization`` option of a config: equalizes ``model`` in place
    when it is set."""
    if cfg.cross_layer_equalization:
        cross_layer_equalization(model, inplace=True)
