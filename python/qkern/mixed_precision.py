"""Mixed precision, HAWQ-like: how much each linear's quantization hurts the loss
(:func:`sensitivity`) and which bits each one gets under an average-bits budget
(:func:`allocate_bits`), written as the ``overrides`` of an LLM method config
(:func:`mixed_config`) that the user can read, edit and save as JSON.

Sensitivity, per linear ``l`` of the transformer blocks (the layers the config quantizes):

- ``"hutchinson"``: ``tr(H_l)``, the trace of the Hessian of the calibration LM loss (mean
  next-token cross-entropy) with respect to ``W_l``, by Hutchinson's estimator
  ``E[v^T H v]`` over Rademacher probes ``v`` (seeded). One Hessian-vector product (double
  backprop) per probe and batch serves every layer at once, as PyHessian / HAWQ-v2 do: the
  cross-layer terms ``v_l^T H_lm v_m`` have mean zero, so each layer's estimate is unbiased.
- ``"fisher"``: the empirical Fisher diagonal ``F = mean over calibration rows of g * g``
  (``g`` the gradient of that row's mean loss; its scale is not the Hessian's, only the
  ranking across layers matters).
- ``"kl"``: exact, slowest: the mean per-token ``KL(float || quantized)`` of the model's
  next-token distribution with only layer ``l`` quantized at ``b`` bits (one pass over the
  calibration per layer and bit width).

Predicted loss increase of layer ``l`` at ``b`` bits (``cost[b]``): Hutchinson
``max(tr(H_l), 0) / n_l * ||W_l - Q_b(W_l)||^2`` (HAWQ-v2's Omega; the second-order Taylor
term is half of it, which changes no allocation; a negative estimate, away from a minimum or
from too few probes, predicts no increase rather than a gain), Fisher
``sum(F_l * (W_l - Q_b(W_l))^2)``, KL the measured KL. ``Q_b`` is the config's own
round-to-nearest grid (``bits=b``, its group size and symmetry, built by its quantizer exactly
as ``quantize_model`` stores it: e.g. RTN g64 asymmetric; GPTQ configs are ranked by their RTN
error). Where that grid has no fused kernel (int8 with zero points or groups), the bit width is
written ``{"bits": 8, "group_size": None, "sym": True}``, the int8 kernel's layout. A layer's
bits per weight at ``b`` are the real storage of that built layer
(``weight_q.bits_per_element``: codes + scales + zero points); float (choice ``None``) counts
``float_bits`` (16 by default: a float16 copy; 32 optional).

>>> import torch, qkern
>>> from qkern.mixed_precision import allocate_bits
>>> costs = {"a": {2: 9.0, 4: 1.0, 8: 0.0}, "b": {2: 0.5, 4: 0.1, 8: 0.0}}
>>> allocate_bits(costs, 3.0, choices=(2, 4, 8), sizes={"a": 100, "b": 100})
{'a': {'bits': 4}, 'b': {'bits': 2}}
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .quantization import BaseConfig, RTNConfig, find_blocks
from .quantization.blocks import block_linears
from .quantization.registry import quantizer_for
from .quantization.sequential import SequentialQuantizer

__all__ = ["METHODS", "LayerSensitivity", "allocate_bits", "average_bits", "fisher_diagonal",
           "hessian_trace", "lm_loss", "mixed_config", "predicted_increase", "sensitivity",
           "uniform"]

METHODS = ("hutchinson", "fisher", "kl")
ALLOCATORS = ("knapsack", "greedy")


@dataclass
class LayerSensitivity:
    """One layer's sensitivity: ``numel`` weights, ``score`` (the Hessian trace, the Fisher
    trace, or NaN for ``"kl"``), ``cost[b]`` the predicted loss increase at ``b`` bits and
    ``bits_per_weight[b]`` its real storage there (codes + scales + zero points)."""

    numel: int
    score: float
    cost: dict[int, float] = field(default_factory=dict)
    bits_per_weight: dict[int, float] = field(default_factory=dict)
    #: how each bit width is written in the config's ``overrides`` (``{"bits": b}``, or with
    #: ``"group_size": None, "sym": True`` where only that runs on a fused kernel, as int8)
    override: dict[int, dict] = field(default_factory=dict)


# ---- the loss and the layers ------------------------------------------------------------------


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on token ids ``ids`` (B, T)."""
    logits = _logits(model(ids)).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _batches(calibration, batch_size: int) -> list[torch.Tensor]:
    """Calibration token tensors, consecutive ones of one length stacked ``batch_size`` rows
    at a time."""
    if isinstance(calibration, torch.Tensor) or calibration is None:
        raise TypeError("calibration must be a list of token id tensors ((1, T) or (B, T) "
                        "int64, e.g. qkern.quantization.text_calibration(...))")
    rows: list[torch.Tensor] = []
    for x in calibration:
        if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2):
            raise TypeError(f"calibration items must be token id tensors (T,) or (B, T) (or "
                            f"(B, features) inputs of a custom loss_fn), got {type(x).__name__}")
        rows.extend(x.view(-1, x.shape[-1]))
    if not rows:
        raise ValueError("calibration is empty: it yielded no batches")
    out, cur = [], [rows[0]]
    for r in rows[1:]:
        if len(cur) == batch_size or r.shape != cur[0].shape:
            out.append(torch.stack(cur))
            cur = []
        cur.append(r)
    out.append(torch.stack(cur))
    return out


def _weights(model: nn.Module, layers: Sequence[str]) -> list[torch.Tensor]:
    ws = []
    for n in layers:
        try:
            ws.append(model.get_submodule(n).weight)
        except AttributeError:
            raise ValueError(f"layer {n!r} is not a module with a weight in the model") from None
    return ws


class _Grad:
    """Gradients for ``weights`` only (everything else frozen), flags restored on exit; the
    math attention kernel, the one that supports double backprop."""

    def __init__(self, model: nn.Module, weights: list[torch.Tensor]):
        self.model, self.weights = model, weights

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.flags:
            p.requires_grad_(False)
        for w in self.weights:
            w.requires_grad_(True)
        self.training = self.model.training
        self.model.eval()
        self.grad = torch.enable_grad()
        self.grad.__enter__()
        self.sdpa = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
        self.sdpa.__enter__()
        return self

    def __exit__(self, *exc):
        self.sdpa.__exit__(*exc)
        self.grad.__exit__(*exc)
        for p, f in self.flags:
            p.requires_grad_(f)
        self.model.train(self.training)


def hessian_trace(model: nn.Module, calibration, layers: Sequence[str], n_probes: int = 16,
                  seed: int = 0, loss_fn=lm_loss, batch_size: int = 16,
                  progress: bool = False) -> dict[str, float]:
    """Hutchinson estimates of ``tr(d^2 L / dW_l^2)`` for each layer name in ``layers``,
    ``L`` the mean of ``loss_fn(model, batch)`` over the calibration batches (weighted by
    rows): the mean over ``n_probes`` Rademacher probes (``torch.Generator`` seeded with
    ``seed``) of ``v^T H v``, by double backprop."""
    if not isinstance(n_probes, int) or isinstance(n_probes, bool) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive int, got {n_probes!r}")
    batches = _batches(calibration, batch_size)
    rows = sum(b.shape[0] for b in batches)
    ws = _weights(model, layers)
    g = torch.Generator().manual_seed(seed)
    acc = [0.0] * len(ws)
    with _Grad(model, ws):
        bar = tqdm(total=n_probes * len(batches), desc="hutchinson", disable=not progress)
        for b in batches:
            grads = torch.autograd.grad(loss_fn(model, b) * (b.shape[0] / rows), ws,
                                        create_graph=True)
            for p in range(n_probes):
                vs = [torch.randint(0, 2, w.shape, generator=g).to(w.dtype) * 2 - 1 for w in ws]
                hv = torch.autograd.grad(grads, ws, grad_outputs=vs,
                                         retain_graph=p < n_probes - 1)
                for i, (v, h) in enumerate(zip(vs, hv)):
                    acc[i] += float((v * h).sum()) / n_probes
                bar.update()
        bar.close()
    return dict(zip(layers, acc))


def fisher_diagonal(model: nn.Module, calibration, layers: Sequence[str], loss_fn=lm_loss,
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """The empirical Fisher diagonal of each layer's weight: the mean over calibration rows
    of the squared gradient of that row's ``loss_fn``."""
    rows = [r.unsqueeze(0) for b in _batches(calibration, 1) for r in b]
    ws = _weights(model, layers)
    acc = [torch.zeros_like(w, dtype=torch.float64) for w in ws]
    with _Grad(model, ws):
        for r in tqdm(rows, desc="fisher", disable=not progress):
            for a, gr in zip(acc, torch.autograd.grad(loss_fn(model, r), ws)):
                a += gr.double() ** 2 / len(rows)
    return dict(zip(layers, acc))


def _layer_quantizers(model: nn.Module, config: BaseConfig, bits: Sequence[int],
                      layers: Sequence[str] | None):
    """[(name, linear, {b: (dequantized weight, bits per weight)})] for the block linears the
    config quantizes (or ``layers``), each built at every ``b`` by the config's quantizer."""
    q = quantizer_for(config)
    if not isinstance(q, SequentialQuantizer):
        raise TypeError("config must be an LLM method config (RTNConfig, GPTQConfig, ...), "
                        f"got {type(config).__name__}")
    if layers is None:
        list_name, blocks = find_blocks(model)
        layers = [f"{list_name}.{i}.{rel}" for i, blk in enumerate(blocks)
                  for rel in block_linears(blk)]
        layers = [n for n in layers if q.layer_config(n, model.get_submodule(n)) is not None]
    out = []
    for n in layers:
        lin = model.get_submodule(n)
        base = config.for_layer(n) or config
        built = {}
        for b in bits:
            ov = {"bits": b}
            cfg = dataclasses.replace(base, **ov)
            qb = quantizer_for(cfg)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if qb.preflight(n, lin, cfg) is not None:  # e.g. int8 needs sym per channel
                    ov = {"bits": b, "group_size": None, "sym": True}
                    alt = dataclasses.replace(base, **ov)
                    why = qb.preflight(n, lin, alt)
                    if why is not None:
                        raise ValueError(f"{n}: {b} bits cannot run on a fused kernel ({why}); "
                                         "leave it out of bits")
                    cfg = alt
                new = qb.rtn_layer(n, lin, cfg)
            built[b] = (new.dequantize_weight().detach().to(lin.weight.dtype),
                        float(new.weight_q.bits_per_element), ov)
        out.append((n, lin, built))
    return out


def _kl_costs(model, batches, built, progress) -> dict[str, dict[int, float]]:
    with torch.no_grad():
        ref = [F.log_softmax(_logits(model(b)).float(), -1) for b in batches]
        tokens = sum(r.shape[0] * r.shape[1] for r in ref)
        out = {}
        for n, lin, by_bits in tqdm(built, desc="kl", disable=not progress):
            w0 = lin.weight.data.clone()
            out[n] = {}
            for b, (wq, _, _) in by_bits.items():
                lin.weight.data.copy_(wq)
                kl = 0.0
                for x, lp in zip(batches, ref):
                    lq = F.log_softmax(_logits(model(x)).float(), -1)
                    kl += float((lp.exp() * (lp - lq)).sum())
                out[n][b] = kl / tokens
            lin.weight.data.copy_(w0)
    return out


def sensitivity(model: nn.Module, calibration, method: str = "hutchinson",
                bits: Sequence[int] = (2, 3, 4, 8), config: BaseConfig | None = None,
                n_probes: int = 16, seed: int = 0, layers: Sequence[str] | None = None,
                batch_size: int = 16, progress: bool = False) -> dict[str, LayerSensitivity]:
    """{layer name: :class:`LayerSensitivity`} for each linear of ``model``'s transformer
    blocks that ``config`` quantizes (default ``RTNConfig(group_size=64, sym=False)``; or the
    names in ``layers``), on ``calibration`` (a list of int64 token id tensors, stacked
    ``batch_size`` rows at a time). ``method``: ``"hutchinson"`` (``n_probes``, ``seed``),
    ``"fisher"`` or ``"kl"`` (see the module docstring). ``model`` is left as it was."""
    if method not in METHODS:
        raise ValueError(f"unknown sensitivity method {method!r}; choose from {METHODS}")
    bits = tuple(bits)
    if not bits or any(not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 8
                       for b in bits):
        raise ValueError(f"bits must be a non-empty sequence of ints in 2..8, got {bits!r}")
    if config is None:
        config = RTNConfig(bits=4, group_size=64, sym=False)
    if not isinstance(config, BaseConfig):
        raise TypeError(f"config must be a qkern config, got {type(config).__name__}")
    batches = _batches(calibration, batch_size)
    built = _layer_quantizers(model, config, bits, layers)
    names = [n for n, _, _ in built]
    if not names:
        raise ValueError("no layer to measure: the config quantizes none of the model's linears")
    out = {}
    if method == "kl":
        costs = _kl_costs(model, batches, built, progress)
        for n, lin, by_bits in built:
            out[n] = LayerSensitivity(lin.weight.numel(), math.nan, costs[n],
                                      {b: v[1] for b, v in by_bits.items()},
                                      {b: v[2] for b, v in by_bits.items()})
        return out
    if method == "hutchinson":
        tr = hessian_trace(model, batches, names, n_probes, seed, batch_size=batch_size,
                           progress=progress)
    else:
        fd = fisher_diagonal(model, batches, names, progress=progress)
    for n, lin, by_bits in built:
        w = lin.weight.detach().double()
        cost = {}
        for b, (wq, _, _) in by_bits.items():
            d2 = (w - wq.double()) ** 2
            cost[b] = (max(tr[n], 0.0) / w.numel() * float(d2.sum()) if method == "hutchinson"
                       else float((fd[n] * d2).sum()))
        score = tr[n] if method == "hutchinson" else float(fd[n].sum())
        out[n] = LayerSensitivity(w.numel(), score, cost, {b: v[1] for b, v in by_bits.items()},
                                  {b: v[2] for b, v in by_bits.items()})
    return out


# ---- allocation ---------------------------------------------------------------------------------


def _check_choices(choices) -> tuple:
    choices = tuple(choices)
    if not choices or any(c is not None and (not isinstance(c, int) or isinstance(c, bool)
                                             or not 2 <= c <= 8) for c in choices):
        raise ValueError(f"choices must be bit widths in 2..8 or None (float), got {choices!r}")
    if len(set(choices)) != len(choices):
        raise ValueError(f"choices has duplicates: {choices!r}")
    return choices


def _problem(sensitivities, choices, sizes, float_bits):
    """names, numel (L,), weights in bits (L, C) ints, costs (L, C) floats (inf: not
    allowed)."""
    if not isinstance(sensitivities, Mapping) or not sensitivities:
        raise ValueError("sensitivities must be a non-empty dict {layer name: "
                         "LayerSensitivity or {bits: predicted increase}}")
    if isinstance(float_bits, bool) or float_bits not in (16, 32):
        raise ValueError(f"float_bits must be 16 or 32, got {float_bits!r}")
    names = list(sensitivities)
    numel, wts, costs = [], [], []
    for n in names:
        s = sensitivities[n]
        if isinstance(s, LayerSensitivity):
            k, cost, bpw = s.numel, s.cost, s.bits_per_weight
        elif isinstance(s, Mapping):
            if sizes is None or n not in sizes:
                raise ValueError(f"sizes must give the weight count of layer {n!r} when "
                                 "sensitivities are plain dicts")
            k, cost, bpw = sizes[n], s, {}
        else:
            raise TypeError(f"sensitivities[{n!r}] must be a LayerSensitivity or a dict "
                            f"{{bits: cost}}, got {type(s).__name__}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"layer {n!r}: weight count must be a positive int, got {k!r}")
        row_w, row_c = [], []
        for c in choices:
            if c is None:
                row_w.append(k * float_bits)
                row_c.append(0.0)
                continue
            if c not in cost:
                raise ValueError(f"layer {n!r} has no predicted increase for {c} bits "
                                 f"(it has {sorted(cost)}); measure those bits")
            v = float(cost[c])
            if not math.isfinite(v):
                raise ValueError(f"layer {n!r}: cost at {c} bits is {v}")
            row_w.append(round(k * bpw.get(c, c)))
            row_c.append(v)
        numel.append(k)
        wts.append(row_w)
        costs.append(row_c)
    return names, np.array(numel, np.int64), np.array(wts, np.int64), np.array(costs)


def _knapsack(wts, costs, cap, max_states):
    """Multiple-choice knapsack by dynamic programming over the bits above each layer's
    lightest choice, in units of their gcd (coarser, rounded up, past ``max_states``):
    exact when the gcd unit fits."""
    extra = wts - wts.min(1, keepdims=True)
    unit = int(np.gcd.reduce(extra[extra > 0])) if (extra > 0).any() else 1
    if cap // unit + 1 > max_states:
        unit = -(-cap // (max_states - 1))
    e = -(-extra // unit)  # ceil: never over the budget
    s = cap // unit + 1
    dp = np.full(s, np.inf)
    dp[0] = 0.0
    pick = np.zeros((len(wts), s), np.int8)
    for i in range(len(wts)):
        new = np.full(s, np.inf)
        for j in range(wts.shape[1]):
            k = int(e[i, j])
            if k >= s:
                continue
            cand = np.full(s, np.inf)
            cand[k:] = dp[:s - k] + costs[i, j]
            better = cand < new
            new[better] = cand[better]
            pick[i, better] = j
        dp = new
    c = int(np.argmin(dp))
    out = [0] * len(wts)
    for i in range(len(wts) - 1, -1, -1):
        j = int(pick[i, c])
        out[i] = j
        c -= int(e[i, j])
    return out


def _greedy(wts, costs, cap):
    """Start each layer at its lightest choice; repeatedly take the move (a layer to a
    heavier, cheaper choice) with the largest cost drop per extra bit that still fits."""
    cur = [int(np.lexsort((costs[i], wts[i]))[0]) for i in range(len(wts))]
    used = int(sum(wts[i, j] for i, j in enumerate(cur)))
    while True:
        best = None
        for i, j0 in enumerate(cur):
            for j in range(wts.shape[1]):
                dw, dc = wts[i, j] - wts[i, j0], costs[i, j0] - costs[i, j]
                if dw > 0 and dc > 0 and used + dw <= cap:
                    r = dc / dw
                    if best is None or r > best[0]:
                        best = (r, i, j, dw)
        if best is None:
            return cur
        _, i, j, dw = best
        cur[i] = j
        used += int(dw)


def allocate_bits(sensitivities: Mapping, budget: float,
                  choices: Sequence[int | None] = (2, 3, 4, 8, None),
                  sizes: Mapping[str, int] | None = None, method: str = "knapsack",
                  float_bits: int = 16, max_states: int = 2_000_000) -> dict:
    """Per-layer bits minimizing the summed predicted loss increase subject to an average of
    at most ``budget`` bits per weight over the layers (each counted at its real storage:
    ``LayerSensitivity.bits_per_weight``; plain ``{bits: cost}`` dicts count ``b`` bits per
    weight and need ``sizes`` {layer: weight count}; ``None`` = float at ``float_bits``).
    ``method``: ``"knapsack"`` (exact dynamic programming, see :func:`_knapsack`) or
    ``"greedy"``. Returns config overrides: ``{layer name: {"bits": b}}``, None for float."""
    if method not in ALLOCATORS:
        raise ValueError(f"unknown allocation method {method!r}; choose from {ALLOCATORS}")
    if (not isinstance(budget, (int, float)) or isinstance(budget, bool)
            or not math.isfinite(budget) or budget <= 0):
        raise ValueError(f"budget must be a positive finite number of bits per weight, "
                         f"got {budget!r}")
    choices = _check_choices(choices)
    names, numel, wts, costs = _problem(sensitivities, choices, sizes, float_bits)
    lightest = float(wts.min(1).sum()) / float(numel.sum())
    if budget < lightest - 1e-9:
        raise ValueError(f"budget {budget} bits per weight is below the smallest allocation "
                         f"possible with choices {choices}: {lightest:.4f}")
    cap = int(math.floor(budget * int(numel.sum()) + 1e-6)) - int(wts.min(1).sum())
    cap = max(cap, 0)
    if method == "greedy":
        pick = _greedy(wts, costs, cap + int(wts.min(1).sum()))
    else:
        pick = _knapsack(wts, costs, cap, max_states)
    return {n: _override(sensitivities[n], choices[j]) for n, j in zip(names, pick)}


def _override(s, b):
    if b is None:
        return None
    return dict(s.override.get(b, {"bits": b})) if isinstance(s, LayerSensitivity) else {"bits": b}


def _bits_of(v):
    return None if v is None else v["bits"] if isinstance(v, dict) else v


def average_bits(sensitivities: Mapping, overrides: Mapping, sizes: Mapping | None = None,
                 float_bits: int = 16) -> float:
    """The average bits per weight of an allocation (as :func:`allocate_bits` counts)."""
    tot = n_all = 0.0
    for n, v in overrides.items():
        s, b = sensitivities[n], _bits_of(v)
        k = s.numel if isinstance(s, LayerSensitivity) else sizes[n]
        bpw = float_bits if b is None else (
            s.bits_per_weight.get(b, b) if isinstance(s, LayerSensitivity) else b)
        tot += k * bpw
        n_all += k
    return tot / n_all


def predicted_increase(sensitivities: Mapping, overrides: Mapping) -> float:
    """The summed predicted loss increase of an allocation."""
    out = 0.0
    for n, v in overrides.items():
        s, b = sensitivities[n], _bits_of(v)
        if b is not None:
            out += (s.cost if isinstance(s, LayerSensitivity) else s)[b]
    return out


def mixed_config(config: BaseConfig, overrides: Mapping) -> BaseConfig:
    """``config`` with ``overrides`` (exact layer names, from :func:`allocate_bits`) placed
    before its own patterns (the first match wins)."""
    if not isinstance(config, BaseConfig):
        raise TypeError(f"config must be a qkern config, got {type(config).__name__}")
    merged = {n: (None if v is None else dict(v)) for n, v in overrides.items()}
    merged.update({k: v for k, v in config.overrides.items() if k not in merged})
    return dataclasses.replace(config, overrides=merged)


def uniform(sensitivities: Mapping, bits: int | None) -> dict:
    """The uniform allocation: every layer at ``bits`` (None: float), written as
    :func:`allocate_bits` writes it."""
    return {n: _override(s, bits) for n, s in sensitivities.items()}

