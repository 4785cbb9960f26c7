"""SmoothQuant (Xiao et al. 2023): per input channel j of a linear layer,
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (Eq. 4, default alpha = 0.5) from calibration
inputs X; the activation outlier channels shrink (X_j / s_j, folded into the preceding norm or
linear) and the weight columns grow (W_j * s_j), so int8 activations lose less. The block
computes the same function in float.

- :class:`SmoothQuantConfig` / :class:`SmoothQuantQuantizer`: the LLM method on transformers
  models (block by block through the sequential pipeline): smoothing folded into the preceding
  LayerNorm / RMSNorm (norm -> q/k/v, norm -> gate/up or fc1, as the paper and its code do)
  and, with ``pairs="all"``, into the preceding linear where the math allows (v -> o, up ->
  down, fc1 -> fc2 under ReLU), then W8A8 on qkern's int8 x int8 kernel: int8 weights per
  output channel, int8 activations per token (dynamic), per tensor (dynamic) or per tensor with
  a scale calibrated on the smoothed inputs (static): the paper's O1 / O2 / O3.
- :func:`smooth_quant`: the smoothing alone on a whole model (``StaticConfig(smoothing_alpha=)``
  runs it): ``nn.Sequential`` layer pairs and the pairs inside transformer blocks.
- :func:`smoothing_scales`, :func:`channel_absmax`, :func:`smooth_block`: the pieces.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..._checks import warn_user
from ...nn import QuantLinear
from ..blocks import find_blocks, fold_scales, is_norm, scale_pairs
from ..calibration import as_batches, input_rows, run_batches
from ..constraints import check_dynamic_activations, check_input_format, constrain_activation
from ..distributed import active, all_reduce_max, all_reduce_sum
from ..layers import weight_module
from ..registry import (
    BaseConfig,
    check_choice,
    check_real,
    config_class,
    register_quantizer,
    replace_module,
)
from ..sequential import (
    BlockContext,
    SequentialQuantizer,
    check_weight_bits,
    relative_output_error,
)
from .equalization import column_view, layer_pairs, rescale_pair

__all__ = ["ACT_MODES", "LEVELS", "SmoothQuantConfig", "SmoothQuantQuantizer",
           "channel_absmax", "input_statistics", "smooth_block", "smooth_quant", "smoothing_scales"]

#: activation mode -> QuantLinear ``act`` (qkern's W8A8 kernel)
ACT_MODES = {"dynamic_token": "int8_dynamic", "dynamic_tensor": "int8_dynamic_tensor",
             "static_tensor": "int8_static"}
#: the paper's efficiency levels (Table 2): O1 per-token dynamic, O2 per-tensor dynamic,
#: O3 per-tensor static activations
LEVELS = {"O1": "dynamic_token", "O2": "dynamic_tensor", "O3": "static_tensor"}
PAIR_MODES = ("all", "norms", "none")
S_MIN, S_MAX = 1e-5, 1e5


def smoothing_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor],
                     alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (float64, (K,)): ``act_absmax`` the
    max |x_j| over the calibration inputs, ``max|W_j|`` over column j of every weight (out, K)
    reading that input. Channels with a zero on either side keep s_j = 1; s is clamped to
    [1e-5, 1e5]."""
    ax = act_absmax.detach().double().reshape(-1)
    aw = torch.stack([w.detach().double().abs().amax(0) for w in weights]).amax(0)
    if aw.shape != ax.shape:
        raise ValueError(f"activation max has {ax.numel()} channels, weights have "
                         f"{aw.numel()} input columns")
    ok = (ax > 0) & (aw > 0)
    s = torch.where(ok, ax.clamp_min(1e-30) ** alpha / aw.clamp_min(1e-30) ** (1 - alpha),
                    1.0)
    return s.clamp(S_MIN, S_MAX)


Stats = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def input_statistics(model: nn.Module, names: Iterable[str], batches: Sequence,
                     grams: bool = False) -> Stats:
    """One pass over ``batches``: ({name: max |x_j| (K,) float32}, {name: X^T X / N (K, K)
    float64, products in float32; empty unless ``grams``}) of each named linear's input rows.
    Raises ValueError for a layer that did not run."""
    amax: dict[str, torch.Tensor] = {}
    acc: dict[str, list] = {}

    def hook(n):
        def pre(mod, args):
            r = input_rows(mod, args[0])
            a = r.abs().amax(0)
            amax[n] = a if n not in amax else torch.maximum(amax[n], a)
            if grams:
                g = (r.T @ r).double()
                if n in acc:
                    acc[n][0] += g
                    acc[n][1] += r.shape[0]
                else:
                    acc[n] = [g, r.shape[0]]
        return pre

    names = list(names)
    run_batches(model, batches, {n: (hook(n), None) for n in names})
    if active() is not None:  # data-parallel calibration: combine every rank's shard
        ran = all_reduce_sum(torch.tensor([int(n in amax) for n in names]))
        for n, r in zip(names, ran.tolist()):
            k = model.get_submodule(n).in_features
            a = all_reduce_max(amax.get(n, torch.zeros(k)))
            if grams:
                g, cnt = acc.get(n, [torch.zeros(k, k, dtype=torch.float64), 0])
                cnt = int(all_reduce_sum(torch.tensor([cnt], dtype=torch.int64)))
                acc[n] = [all_reduce_sum(g), cnt]
            if r:
                amax[n] = a
            else:
                amax.pop(n, None)
                acc.pop(n, None)
    for n in names:
        if n not in amax:
            raise ValueError(f"{n}: the layer did not run on the calibration data")
    return amax, {n: g / max(k, 1) for n, (g, k) in acc.items()}


def channel_absmax(model: nn.Module, names: Iterable[str], batches: Sequence
                   ) -> dict[str, torch.Tensor]:
    """{name: max |x_j| (K,) float32} over the input rows of each named linear of ``model``
    on ``batches``. Raises ValueError for a layer that did not run."""
    return input_statistics(model, names, batches)[0]


def _alpha_of(alpha: float | Mapping[str, float], nexts: Sequence[str]) -> float | None:
    if not isinstance(alpha, Mapping):
        return float(alpha)
    for n in nexts:
        if n in alpha:
            return float(alpha[n])
    return None


def smooth_block(block: nn.Module, batches: Sequence, alpha: float | Mapping[str, float] = 0.5,
                 pairs: Sequence[tuple[str, Sequence[str]]] | None = None,
                 absmax: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Smooths ``block`` in place: for each (prev, linears) pair (default
    :func:`~qkern.quantization.blocks.scale_pairs`), ``s`` from :func:`smoothing_scales` on the
    linears' input max over ``batches`` (or ``absmax`` {first linear: max}) and weights, all
    computed before any folding, then folded (:func:`~qkern.quantization.blocks.fold_scales`).
    ``alpha``: a number or {linear name: alpha} (pairs with none of their linears in it are
    left alone). Returns {prev: s}."""
    pairs = scale_pairs(block) if pairs is None else pairs
    todo = [(p, list(ns)) for p, ns in pairs if _alpha_of(alpha, ns) is not None]
    if absmax is None:
        absmax = channel_absmax(block, [ns[0] for _, ns in todo], batches)
    scales = {}
    for p, ns in todo:
        ws = [block.get_submodule(n).weight for n in ns]
        scales[p] = smoothing_scales(absmax[ns[0]], ws, _alpha_of(alpha, ns))
    for p, ns in todo:
        fold_scales(block, p, ns, scales[p])
    return scales


# ---- the whole-model smoothing of StaticConfig(smoothing_alpha=...) ---------------------------


def _block_pairs(model: nn.Module, want: set[str] | None, taken: set[str]
                 ) -> list[tuple[str, list[str]]]:
    """(prev, linears) pairs inside the model's transformer blocks, with full names."""
    try:
        list_name, blocks = find_blocks(model)
    except ValueError:
        return []
    out = []
    for i, blk in enumerate(blocks):
        pre = f"{list_name}.{i}."
        for p, ns in scale_pairs(blk):
            full = [pre + n for n in ns]
            if taken & set(full) or (want is not None and not want & set(full)):
                continue
            out.append((pre + p, full))
    return out


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
    """SmoothQuant's per-input-channel migration on a whole model, folded into the preceding
    layer: for each pair (layer1 -> layer2 of an ``nn.Sequential``, from ``layer_pairs``; and
    inside transformer blocks norm -> q/k/v, norm -> gate/up or fc1, v -> o, up -> down, from
    :func:`~qkern.quantization.blocks.scale_pairs`), layer2 in ``layers`` if given,
    ``s_j = max|X_j|^alpha / max|W2_j|^(1 - alpha)`` over the calibration inputs X of layer2;
    layer1's output channel j is divided by s_j and layer2's input channel j multiplied by it.
    ``alpha``: a number, or {layer2 name: alpha}. Function-preserving in float; works on a
    copy unless ``inplace=True``. Warns when no pair is found (nothing is smoothed)."""
    target = model if inplace else copy.deepcopy(model)
    batches = as_batches(calibration)
    want = None if layers is None else set(layers)
    if isinstance(alpha, dict):
        want = set(alpha) if want is None else want & set(alpha)
    seq = [(a, b) for a, b in layer_pairs(target) if want is None or b in want]
    blk = _block_pairs(target, want, {b for _, b in seq})
    if not seq and not blk:
        warn_user(f"SmoothQuant (smoothing_alpha): no layer pair to fold scales into was found "
                  f"in {type(model).__name__} (an nn.Sequential Linear/Conv -> Linear/Conv, or "
                  "norm -> q/k/v, norm -> MLP, v -> o, up -> down inside transformer blocks); "
                  "nothing was smoothed")
        return target
    hooks, states = {}, {}
    for n1, n2 in seq:
        c = target.get_submodule(n1).weight.shape[0]
        hook, states[n2] = _input_channel_absmax(target.get_submodule(n2), c)
        hooks[n2] = (hook, None)
    firsts = [ns[0] for _, ns in blk]
    amax: dict[str, torch.Tensor] = {}
    for n in firsts:
        def pre(mod, args, n=n):
            a = input_rows(mod, args[0]).abs().amax(0)
            amax[n] = a if n not in amax else torch.maximum(amax[n], a)
        hooks[n] = (pre, None)
    run_batches(target, batches, hooks)  # one pass: folding preserves every pair's input
    for n1, n2 in seq:
        a = alpha.get(n2) if isinstance(alpha, dict) else alpha
        ax = states[n2]["amax"]
        if a is None or ax is None:
            continue
        m1, m2 = target.get_submodule(n1), target.get_submodule(n2)
        aw = column_view(m2, m1.weight.shape[0]).abs().amax(dim=(0, 2))
        rescale_pair(m1, m2, smoothing_scales(ax, [aw.reshape(1, -1)], float(a)).float())
    blk = [(p, ns) for p, ns in blk if ns[0] in amax]
    smooth_block(target, batches, alpha if isinstance(alpha, dict) else float(alpha), blk,
                 absmax=amax)
    return target


# ---- the LLM method ---------------------------------------------------------------------------


@config_class
@dataclass
class SmoothQuantConfig(BaseConfig):
    """SmoothQuant W8A8 (Xiao et al. 2023): migration strength ``alpha`` in [0, 1] (0.5, the
    paper's default); ``act``: ``"dynamic_token"`` (per-token dynamic int8 activations, the
    paper's O1), ``"dynamic_tensor"`` (per-tensor dynamic, O2) or ``"static_tensor"``
    (per-tensor static, the scale max|X| / 127 calibrated on the smoothed inputs, O3); "O1" /
    "O2" / "O3" are accepted. Weights int8 symmetric per output channel. ``pairs``: where the
    scales are folded: ``"all"`` (norm -> q/k/v, norm -> gate/up or fc1, and the linear pairs
    v -> o, up -> down, fc1 -> fc2 where foldable), ``"norms"`` (the norm pairs only, as the
    paper's code), ``"none"`` (no smoothing: plain W8A8, the baseline). ``then``: an LLM method
    config with bits=8, group_size=None, sym=True (e.g. ``GPTQConfig(bits=8,
    group_size=None)``) that quantizes the smoothed weights instead of round to nearest."""

    alpha: float = 0.5
    act: str = "dynamic_token"
    pairs: str = "all"
    then: BaseConfig | None = None

    # the weight side is fixed: int8 per output channel, symmetric (W8A8 kernel)
    bits: ClassVar[int] = 8
    group_size: ClassVar[int | None] = None
    sym: ClassVar[bool] = True

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_real(n, "alpha", self.alpha, 0.0, 1.0, "a number in [0, 1]")
        self.alpha = float(self.alpha)
        check_choice(n, "act", self.act, tuple(ACT_MODES) + tuple(LEVELS))
        self.act = LEVELS.get(self.act, self.act)
        check_choice(n, "pairs", self.pairs, PAIR_MODES)
        check_weight_bits(self)
        super().__post_init__()


@register_quantizer(SmoothQuantConfig)
class SmoothQuantQuantizer(SequentialQuantizer):
    """Per block: the smoothing scales of the pairs the config asks for, from max |X_j| of the
    float block's calibration inputs, folded into the block (:func:`smooth_block`); then each
    linear becomes a W8A8 QuantLinear (``then``'s weights when given). ``scales``
    {full prev name: s} and ``act_absmax`` {full layer name: max |x| of its smoothed input}
    keep what was used. ``constraints``: the int8 weights on :func:`~qkern.quantization.
    constraints.grid_params`' grid (or within the accumulator bound), the static activation
    scale rounded up to a power of two; dynamic activations (O1 / O2) refuse
    ``pow2_scales``, per-token ones (O1) ``per_tensor`` (docs/hardware.md)."""

    GRAMS = False
    APPLIES_CONSTRAINTS = True

    def check_constraints(self, cfg, name: str) -> None:
        """The base rules, and what the activations can honour: power-of-two scales only
        static (``act="static_tensor"``), ``per_tensor`` not per token, inputs of at most the
        accumulator bound's ``input_bits``."""
        super().check_constraints(cfg, name)
        c = cfg.constraints
        what = f"SmoothQuantConfig(act={cfg.act!r}) (layer {name})"
        if cfg.act == "static_tensor":
            check_input_format(c, "int8", what)
        else:
            check_dynamic_activations(c, cfg.act == "dynamic_token", what,
                                      "use act='static_tensor' (O3)")

    def __init__(self, config):
        super().__init__(config)
        self.scales: dict[str, torch.Tensor] = {}
        self.act_absmax: dict[str, float] = {}
        self._grams: dict[str, torch.Tensor] = {}

    def process_block(self, ctx: BlockContext) -> None:
        if not ctx.inputs or not ctx.layers:
            return
        blk, layers = ctx.block, ctx.layers

        def wanted(prev: str, nexts: list[str]) -> bool:
            mode = layers[next(n for n in nexts if n in layers)].pairs
            return mode == "all" or (mode == "norms" and is_norm(blk.get_submodule(prev)))

        pairs = [(p, ns) for p, ns in ctx.pairs if any(n in layers for n in ns) and wanted(p, ns)]
        amax, grams = input_statistics(blk, sorted(set(layers) | {ns[0] for _, ns in pairs}),
                                       ctx.inputs, grams=not self._true_sequential())
        alphas = {n: c.alpha for n, c in layers.items()}
        scales = smooth_block(blk, ctx.inputs, alphas, pairs, absmax=amax)
        by_layer = {n: scales[p] for p, ns in pairs for n in ns}
        foldable = {n for _, ns in ctx.pairs for n in ns}
        for rel, cfg in layers.items():
            full = ctx.full_name(rel)
            ax = amax[rel].double()
            if rel in by_layer:
                ax = ax / by_layer[rel]
                if rel in grams:  # the smoothed input is x / s
                    d = 1.0 / by_layer[rel]
                    grams[rel] = grams[rel] * d[:, None] * d[None, :]
            elif rel not in foldable and cfg.pairs != "none":
                self.notes[full] = ("no foldable predecessor (norm or linear) for its input: "
                                    "W8A8 without smoothing")
            self.act_absmax[full] = float(ax.max())
        for p, s in scales.items():
            self.scales[ctx.full_name(p)] = s
        self._grams = grams

    def _true_sequential(self) -> bool:
        """An inner method that uses Gram matrices gets them true-sequentially (the base
        pipeline); otherwise every layer is quantized from the one statistics pass."""
        return self.inner is not None and self.wants_grams()

    def quantize_block(self, ctx: BlockContext, log) -> None:
        if self._true_sequential() or not ctx.inputs:
            super().quantize_block(ctx, log)
            return
        for rel in [n for g in ctx.groups for n in g if n in ctx.layers]:
            t0 = time.perf_counter()
            lin = ctx.block.get_submodule(rel)
            w = lin.weight.detach().float().clone()
            full = ctx.full_name(rel)
            new = self.quantize_layer(full, lin, None, ctx.layers[rel])
            replace_module(ctx.block, rel, new)
            deq = getattr(new, "dequantize_weight", None)
            err = (relative_output_error(w, deq(), self._grams.get(rel)) if deq is not None
                   else float("nan"))
            log(full, err, time.perf_counter() - t0)
        self._grams = {}

    def act_scale(self, name: str) -> float:
        """The static per-tensor activation scale of layer ``name``: max |x| / 127 of its
        smoothed calibration inputs (the W8A8 kernel's codes are in [-127, 127])."""
        m = self.act_absmax.get(name)
        if m is None:
            raise ValueError(f"{name}: no calibration statistics for its static activation "
                             "scale (did the layer run on the calibration data?)")
        return m / 127.0 if m > 0 else 1.0 / 127.0

    def _static_scale(self, name: str, cfg) -> float:
        """:meth:`act_scale` under the constraints (``constraints.constrain_activation``, as
        StaticConfig's observers: rounded up to a power of two when asked)."""
        sx = torch.tensor(self.act_scale(name), dtype=torch.float32)
        return float(constrain_activation(sx, None, cfg.constraints, name)[0])

    def quantize_layer(self, name: str, linear: nn.Linear, gram: torch.Tensor | None,
                       cfg) -> nn.Module:
        act = ACT_MODES[cfg.act]
        sx = self._static_scale(name, cfg) if act == "int8_static" else None
        if self.inner is not None:
            q = self.inner.quantize_layer(name, linear, gram, self.inner.config)
            return with_activations(q, act, sx, self.notes, name)
        return weight_module(linear, "int8", None, self.notes, name, symmetric=True, act=act,
                             act_scale=sx, constraints=cfg.constraints)


def with_activations(q: nn.Module, act: str, act_scale: float | None, notes: dict,
                     name: str) -> nn.Module:
    """The W8A8 twin of a weight-only int8 per-channel symmetric QuantLinear ``q`` (same
    codes and scales, int8 activations ``act``). Anything else is returned as it is (noted)."""
    wq = getattr(q, "weight_q", None)
    if not (isinstance(q, QuantLinear) and wq.format.name == "int8"
            and wq.granularity == "channel" and wq.zero_point is None):
        notes[name] = (f"the inner method gave a {type(q).__name__} the W8A8 kernel cannot "
                       "take: activations left in float")
        return q
    w = q.dequantize_weight()
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if q.bias is not None:
            lin.bias.copy_(q.bias)
    return QuantLinear.from_float(lin, "int8", group_size=None, symmetric=True, act=act,
                                  act_scale=act_scale, scale=wq.scale)
