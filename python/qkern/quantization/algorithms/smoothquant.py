"""SmoothQuant (Xiao et al. 2023) on the layer pairs of cross-layer equalization: per input
channel j of layer2, ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` from calibration data;
activation outlier channels of layer2's input shrink (folded into layer1) and layer2's
columns grow. ``StaticConfig(smoothing_alpha=...)`` runs it at convert time."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from ..calibration import as_batches, run_batches
from .equalization import column_view, layer_pairs, rescale_pair

__all__ = ["smooth_quant"]


def _input_channel_absmax(m2: nn.Module, c: int):
    """A pre-hook recording max |x_j| per pair channel j of layer2's input."""
    state = {"amax": None}

    def hook(mod, args):
        x = args[0].detach().float()
        if isinstance(m2, nn.Linear):
            a = x.reshape(-1, c, m2.in_features // c).abs().amax(dim=(0, 2))
        else:
            a = x.transpose(0, 1).reshape(c, -1).abs().amax(1)
        state["amax"] = a if state["amax"] is None else torch.maximum(state["amax"], a)

    return hook, state


def smooth_quant(model: nn.Module, calibration: Iterable, alpha: float | dict = 0.5,
                 inplace: bool = False, layers: Iterable[str] | None = None) -> nn.Module:
    """SmoothQuant's per-input-channel migration, folded into the preceding layer: for each
    pair (layer1, layer2) of ``layer_pairs`` (layer2 in ``layers`` if given),
    ``s_j = max|X_j|^alpha / max|W2_j|^(1 - alpha)`` over calibration inputs X of layer2;
    layer1's output channel j is divided by s_j and layer2's input channel j multiplied by it,
    so layer2's activations have flatter channel ranges for per-tensor activation
    quantization. ``alpha``: a number, or {layer2 name: alpha}. Function-preserving in float;
    works on a copy unless ``inplace=True``. Layers without a foldable predecessor (the
    model's first layer, layers after norms or residual adds) are not smoothed."""
    target = model if inplace else copy.deepcopy(model)
    batches = as_batches(calibration)
    want = None if layers is None else set(layers)
    pairs = [(a, b) for a, b in layer_pairs(target) if want is None or b in want]
    hooks, states = {}, {}
    for n1, n2 in pairs:
        c = target.get_submodule(n1).weight.shape[0]
        hook, states[n2] = _input_channel_absmax(target.get_submodule(n2), c)
        hooks[n2] = (hook, None)
    run_batches(target, batches, hooks)
    for n1, n2 in pairs:
        a = alpha.get(n2) if isinstance(alpha, dict) else alpha
        ax = states[n2]["amax"]
        if a is None or ax is None:
            continue
        m1, m2 = target.get_submodule(n1), target.get_submodule(n2)
        aw = column_view(m2, m1.weight.shape[0]).abs().amax(dim=(0, 2)).double()
        ax = ax.double()
        ok = (ax > 0) & (aw > 0)
        s = torch.where(ok, ax.clamp_min(1e-30) ** a / aw.clamp_min(1e-30) ** (1 - a), 1.0)
        rescale_pair(m1, m2, s.clamp(1e-5, 1e5).float())
    return target
