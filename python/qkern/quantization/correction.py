"""Calibration and error correction around weight quantization.

- :func:`cross_layer_equalization`: Nagel et al. 2019 (data-free). For a pair layer1 ->
  (ReLU / identity) -> layer2, output channel i of layer1 is divided by
  ``s_i = sqrt(r1_i / r2_i)`` and input channel i of layer2 multiplied by it, where ``r1_i``
  and ``r2_i`` are the ranges (max |w|) of those channels; both then have the range
  ``sqrt(r1_i * r2_i)``. Exact in float because ReLU(x / s) = ReLU(x) / s for s > 0.
- :func:`smooth_quant`: SmoothQuant (Xiao et al. 2023) on the same pairs with
  ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` from calibration data: activation outlier
  channels of layer2's input shrink (folded into layer1) and layer2's columns grow.
- :func:`bias_correction`: empirical bias correction (Nagel et al. 2019, AIMET's empirical
  variant): the mean output error E[y_q - y_float] of each quantized layer on calibration data,
  per output channel, subtracted from its bias, layer by layer in execution order.
- :func:`output_clip_search` ("ghost clipping"): each weight's clip ratio chosen from a grid
  to minimise the layer's output error on its calibration inputs, sum over rows
  ``(w - w_q) H (w - w_q)^T`` with ``H = X^T X``, instead of the weight MSE.

Pairs are found among the direct children of ``nn.Sequential`` containers only: a Linear /
Conv (groups=1), then any of ReLU, LeakyReLU, Identity, Dropout, MaxPool, AvgPool (and one
Flatten when a conv feeds a Linear), then a Linear / Conv of matching channels. Layers joined
by code in a ``forward`` (residuals, attention, norms) are not paired.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import formats as QF
from ..nn import QuantConv1d, QuantConv2d, QuantLinear
from ..quantize import quantize
from .api import _call

__all__ = ["CLIP_GRID", "bias_correction", "cross_layer_equalization", "layer_pairs",
           "output_clip_search", "smooth_quant"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
# modules f with f(x * s) = f(x) * s for a positive per-channel s (channel dim kept)
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
#: clip ratios the output clip search tries (1 = the data range)
CLIP_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(25))  # 1.0 ... 0.4


# ---- running calibration data --------------------------------------------------------------


def _as_batches(calibration: Iterable) -> list:
    if calibration is None:
        raise ValueError("calibration data is required: an iterable of model inputs")
    if isinstance(calibration, torch.Tensor):
        raise TypeError("calibration must be an iterable of batches (e.g. [x1, x2] or "
                        "x.split(64)), not one tensor")
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty: it yielded no batches")
    return batches


def run_batches(model: nn.Module, batches: Sequence,
                hooks: dict[str, tuple] | None = None) -> None:
    """Runs every batch through ``model`` (eval mode, no gradients) with forward hooks:
    ``hooks`` maps a module name to ``(pre_hook, post_hook)`` (either may be None)."""
    handles = []
    for name, (pre, post) in (hooks or {}).items():
        mod = model.get_submodule(name)
        if pre is not None:
            handles.append(mod.register_forward_pre_hook(pre))
        if post is not None:
            handles.append(mod.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                _call(model, b)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def execution_order(model: nn.Module, names: Iterable[str], batches: Sequence) -> list[str]:
    """``names`` in the order their modules first run on the first batch (modules that do
    not run come last, in the order given)."""
    names = list(names)
    seen: list[str] = []

    def pre(name):
        def hook(mod, args):
            if name not in seen:
                seen.append(name)
        return hook

    run_batches(model, batches[:1], {n: (pre(n), None) for n in names})
    return seen + [n for n in names if n not in seen]


def _rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as the rows its weight matrix (out, K) multiplies: (N, K)."""
    x = x.detach().float()
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, mod.in_features)
    two_d = isinstance(mod, nn.Conv2d)
    if not two_d:
        x = x.unsqueeze(-2)
    ks = mod.kernel_size if two_d else (1, *mod.kernel_size)
    st = mod.stride if two_d else (1, *mod.stride)
    pd = mod.padding if two_d else (0, *mod.padding)
    dl = mod.dilation if two_d else (1, *mod.dilation)
    cols = F.unfold(x, ks, dilation=dl, padding=pd, stride=st)  # (B, C*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def weight_matrix(mod: nn.Module) -> torch.Tensor:
    """(out, K) float32: the matrix a Linear / Conv multiplies its input rows with."""
    w = mod.weight.detach().float()
    return w.reshape(w.shape[0], -1)


class Gram:
    """A pre-hook accumulating ``X^T X`` over a layer's input rows (float64); ``matrix()``
    is its mean over rows."""

    def __init__(self, mod: nn.Module):
        self.mod, self.h, self.n = mod, None, 0

    def __call__(self, module, args):
        r = _rows(self.mod, args[0]).double()
        self.h = r.T @ r if self.h is None else self.h + r.T @ r
        self.n += r.shape[0]

    def matrix(self) -> torch.Tensor:
        if self.h is None:
            raise ValueError("the layer did not run on the calibration data")
        return self.h / self.n


def collect_grams(model: nn.Module, names: Iterable[str], batches: Sequence
                  ) -> dict[str, torch.Tensor]:
    """{name: X^T X / N} of each layer's calibration inputs (float64)."""
    grams = {n: Gram(model.get_submodule(n)) for n in names}
    run_batches(model, batches, {n: (g, None) for n, g in grams.items()})
    out = {}
    for n, g in grams.items():
        if g.h is None:
            raise ValueError(f"{n}: the layer did not run on the calibration data")
        out[n] = g.matrix()
    return out


# ---- layer pairs, CLE and SmoothQuant --------------------------------------------------------


def layer_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer1, layer2) names joined only by positively homogeneous modules inside one
    ``nn.Sequential`` (see the module docstring)."""
    pairs = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.named_children())
        for i, (n1, m1) in enumerate(kids):
            if type(m1) not in _LAYERS or getattr(m1, "groups", 1) != 1:
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


def _column_view(m2: nn.Module, c: int) -> torch.Tensor:
    """layer2's weight as (out, c, k): input channel i of the pair is w[:, i, :]."""
    return m2.weight.detach().reshape(m2.weight.shape[0], c, -1)


@torch.no_grad()
def _rescale_pair(m1: nn.Module, m2: nn.Module, s: torch.Tensor) -> None:
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
            r2 = _column_view(m2, c).abs().amax(dim=(0, 2)).double()
            s = _safe_ratio(r1, r2).sqrt()
            _rescale_pair(m1, m2, s.float())
            worst = max(worst, float(s.log().abs().max()) if s.numel() else 0.0)
        if worst < 1e-4:
            break
    return target


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
    batches = _as_batches(calibration)
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
        aw = _column_view(m2, m1.weight.shape[0]).abs().amax(dim=(0, 2)).double()
        ax = ax.double()
        ok = (ax > 0) & (aw > 0)
        s = torch.where(ok, ax.clamp_min(1e-30) ** a / aw.clamp_min(1e-30) ** (1 - a), 1.0)
        _rescale_pair(m1, m2, s.clamp(1e-5, 1e5).float())
    return target


# ---- bias correction -------------------------------------------------------------------------


def _float_twin(float_model: nn.Module, name: str) -> nn.Module | None:
    try:
        m = float_model.get_submodule(name)
    except AttributeError:
        return None
    return m if type(m) in _LAYERS else None


def _quantized_layers(qmodel: nn.Module) -> list[str]:
    """Outermost quantized Linear / Conv layers (QuantLinear, QuantConv*, or an ActQuant or
    other wrapper holding one) by name."""
    from .quantizers import ActQuant

    out = []
    for name, m in qmodel.named_modules():
        if not name or any(name.startswith(o + ".") for o in out):
            continue
        if isinstance(m, (QuantLinear, QuantConv1d, QuantConv2d, ActQuant)):
            out.append(name)
    return out


def _bias_owner(m: nn.Module) -> QuantLinear:
    from .quantizers import ActQuant

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
    batches = _as_batches(calibration)
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


# ---- clip search on the output error ("ghost clipping") ---------------------------------------


def clip_searchable(fmt: str) -> bool:
    """Formats whose data-derived scale can be shrunk (integer grids and absmax codebooks;
    not MX's power-of-two scales or the mean-|x| scales of ternary / binary)."""
    f = QF.get(fmt)
    return f.kind in ("int", "codebook") and f.scale_rule in (QF.SCALE_ABSMAX, QF.SCALE_MINMAX)


def output_clip_search(w: torch.Tensor, gram: torch.Tensor, fmt: str, *,
                       group_size: int | None = None, symmetric: bool = True,
                       per_tensor: bool = False, grid: Sequence[float] = CLIP_GRID,
                       cross: torch.Tensor | None = None,
                       **quant_kwargs) -> tuple[dict, torch.Tensor]:
    """Scales (and zero points) for weight ``w`` (out, K) with clip ratios from ``grid`` that
    minimise the output error ``(w - w_q) H (w - w_q)^T`` summed over rows, ``H = gram``
    (K, K) the layer's input second moment. Rows are independent in that error, so each
    output row takes its own ratio (one ratio for the layer when ``per_tensor``).

    With ``cross`` (``E[x^ x^T]``, x^ the input the quantized layer sees and x the float
    model's, ``gram`` then being ``E[x^ x^^T]``) the error is ``E||w x - w_q x^||^2`` up to
    a constant: ``w_q H w_q^T - 2 w_q cross w^T``, so the scales may also make up for error
    made upstream (progressive calibration).

    Returns (keyword arguments ``scale`` / ``zero_point`` for ``qkern.quantize`` in the
    layout of ``group_size`` (None: per output channel), the ratio chosen per row)."""
    w = w.detach().float()
    if per_tensor:
        gran = {"granularity": "tensor"}
    elif group_size is None:
        gran = {"granularity": "channel", "axis": 0}
    else:
        gran = {"granularity": "group", "axis": 1, "group_size": group_size}
    h = gram.to(torch.float64)
    errs, cands = [], []
    for r in grid:
        q = quantize(w, fmt, symmetric=symmetric, clip_ratio=None if r == 1.0 else r,
                     **gran, **quant_kwargs)
        if cross is None:
            d = (w - q.dequantize()).double()
            errs.append(((d @ h) * d).sum(1))
        else:
            wq = q.dequantize().double()
            errs.append(((wq @ h) * wq).sum(1) - 2 * ((wq @ cross.double()) * w.double()).sum(1))
        cands.append(q)
    err = torch.stack(errs)  # (grid, out)
    if per_tensor:
        best = int(err.sum(1).argmin())
        q = cands[best]
        return ({"scale": q.scale, "zero_point": q.zero_point},
                torch.full((w.shape[0],), float(grid[best])))
    pick = err.argmin(0)  # (out,)
    rows = torch.arange(w.shape[0])
    scale = torch.stack([c.scale for c in cands])[pick, rows]
    zp = None
    if cands[0].zero_point is not None:
        zp = torch.stack([c.zero_point for c in cands])[pick, rows]
    ratios = torch.tensor([float(grid[i]) for i in pick.tolist()])
    return {"scale": scale, "zero_point": zp}, ratios


def weight_params(cfg, gram: torch.Tensor | None, notes: dict, name: str,
                  cross: torch.Tensor | None = None):
    """The ``params`` function of ``quantizers._weight_module`` for a layer config: scales
    from the output clip search (with a Gram matrix, and ``cross`` for the progressive
    objective) and / or one per-tensor scale; None when the config asks for neither."""
    per_tensor = getattr(cfg, "per_tensor", False)
    search = getattr(cfg, "clip_search", "none") == "output" and gram is not None
    if search and not clip_searchable(cfg.fmt):
        notes[name] = f"clip_search='output' does not apply to {cfg.fmt}: data range kept"
        search = False
    if not (per_tensor or search):
        return None
    extra = {"rounding": cfg.rounding} if hasattr(cfg, "rounding") else {}

    def params(w: torch.Tensor, group: int | None) -> dict:
        if search:
            kw, _ = output_clip_search(w, gram, cfg.fmt, group_size=group,
                                       symmetric=cfg.symmetric, per_tensor=per_tensor,
                                       cross=cross, **extra)
        else:
            q = quantize(w, cfg.fmt, granularity="tensor", symmetric=cfg.symmetric)
            kw = {"scale": q.scale, "zero_point": q.zero_point}
        if per_tensor:  # one scale, stored as the same scale for every output channel
            zp = kw["zero_point"]
            kw = {"scale": kw["scale"].reshape(()).expand(w.shape[0]).clone(),
                  "zero_point": None if zp is None else zp.reshape(()).expand(w.shape[0])
                  .clone()}
        return kw

    return params


def paired_moments(float_model: nn.Module, qmodel: nn.Module, name: str, batches: Sequence
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E[x^ x^^T], E[x^ x^T])`` over the input rows of layer ``name``: x from
    ``float_model``, x^ from ``qmodel`` (the same samples, batch by batch)."""
    fmod = float_model.get_submodule(name)
    rows: dict[str, torch.Tensor] = {}

    def grab(key):
        def hook(mod, args):
            rows[key] = _rows(fmod, args[0]).double()
        return hook

    hqq = hqf = None
    n = 0
    for b in batches:
        run_batches(float_model, [b], {name: (grab("f"), None)})
        run_batches(qmodel, [b], {name: (grab("q"), None)})
        if "f" not in rows or "q" not in rows:
            raise ValueError(f"{name}: the layer did not run on the calibration data")
        xq, xf = rows.pop("q"), rows.pop("f")
        hqq = xq.T @ xq if hqq is None else hqq + xq.T @ xq
        hqf = xq.T @ xf if hqf is None else hqf + xq.T @ xf
        n += xq.shape[0]
    return hqq / n, hqf / n


def float_copy(model: nn.Module) -> nn.Module:
    """A deep copy of a prepared model with the calibration wrappers taken out (the float
    reference for bias correction and AdaRound's targets)."""
    from .api import _replace
    from .quantizers import ObservedInput

    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, ObservedInput):
            _replace(ref, name, m.module)
    return ref


def capture_inputs(model: nn.Module, name: str, batches: Sequence) -> torch.Tensor:
    """Every calibration input of the float Linear / Conv ``name`` as weight-matrix rows
    (N, K)."""
    mod = model.get_submodule(name)
    if type(mod) not in _LAYERS:
        raise ValueError(f"{name}: expected a float Linear / Conv, got {type(mod).__name__}")
    got: list[torch.Tensor] = []
    run_batches(model, batches, {name: (lambda m, a: got.append(_rows(mod, a[0])), None)})
    if not got:
        raise ValueError(f"{name}: the layer did not run on the calibration data")
    return torch.cat(got)
