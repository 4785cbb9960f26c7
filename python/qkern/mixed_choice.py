"""Mixed precision, verified: :func:`choose_allocation` builds a few allocations that fit an
average-bits budget (the knapsack optimum of :func:`qkern.mixed_precision.allocate_bits`, the
knapsack at a few slightly smaller budgets, every uniform allocation that fits, any the caller
adds), quantizes the model with each and keeps the one with the lowest *measured* loss (or KL
to the float model) on the calibration data.

The knapsack minimizes a *predicted* increase: per-layer costs measured one layer at a time
(or a per-layer second-order term) and added up. Where the gains left are small (4+ bits),
that additive model can rank allocations wrongly, and the optimum can measure worse than a
uniform allocation that fits the same budget. Measuring the candidates settles it, at the
cost of one ``quantize_model`` and one pass over the calibration per distinct candidate.

>>> import torch, qkern
>>> from qkern.mixed_choice import choose_allocation
>>> from qkern.mixed_precision import sensitivity
>>> from qkern.models import Llama, LlamaConfig
>>> _ = torch.manual_seed(0)
>>> model = Llama(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
...                           num_hidden_layers=1, num_attention_heads=2,
...                           num_key_value_heads=2, max_position_embeddings=64)).eval()
>>> cal = [torch.randint(0, 64, (2, 32))]
>>> cfg = qkern.RTNConfig(bits=4, group_size=32, sym=False)
>>> sens = sensitivity(model, cal, method="fisher", config=cfg)
>>> pick = choose_allocation(model, cfg, cal, 3.8, sens)
>>> pick.label in pick.losses and pick.losses[pick.label] == min(pick.losses.values())
True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .mixed_precision import (
    LayerSensitivity,
    allocate_bits,
    average_bits,
    lm_loss,
    mixed_config,
    uniform,
)
from .quantization import BaseConfig, quantize_model

__all__ = ["MEASURES", "AllocationChoice", "allocation_key", "candidate_allocations",
           "choose_allocation", "measure_loss"]

MEASURES = ("loss", "kl")


@dataclass
class AllocationChoice:
    """The chosen allocation (``overrides``, for :func:`qkern.mixed_precision.mixed_config`)
    and its ``label``; ``losses[label]`` the measured calibration loss (or KL) of every
    distinct candidate, ``bits[label]`` its average bits per weight, ``candidates[label]``
    its overrides (labels: ``"knapsack"``, ``"knapsack@B"``, ``"uniform wB"``, ``"uniform
    float"``, or the caller's)."""

    label: str
    overrides: dict
    losses: dict[str, float] = field(default_factory=dict)
    bits: dict[str, float] = field(default_factory=dict)
    candidates: dict[str, dict] = field(default_factory=dict)


def allocation_key(over: Mapping) -> tuple:
    """The hashable key of an allocation (``{layer: override}``) in
    :func:`choose_allocation`'s ``cache``."""
    return tuple(sorted((n, None if v is None else tuple(sorted(v.items())))
                        for n, v in over.items()))


_key = allocation_key


def candidate_allocations(sensitivities: Mapping, budget: float,
                          choices: Sequence[int | None] = (2, 3, 4, 8, None),
                          below: Sequence[float] = (0.025, 0.05, 0.1), float_bits: int = 16,
                          extra: Mapping[str, Mapping] | None = None) -> dict[str, dict]:
    """{label: overrides}, distinct allocations within ``budget`` bits per weight: the
    knapsack optimum, the knapsack at ``budget - d`` for each ``d`` in ``below`` (those at or
    above the lightest allocation), every uniform allocation among ``choices`` that fits,
    then ``extra`` (a ValueError if one is over the budget or names other layers)."""
    if any(not isinstance(d, (int, float)) or isinstance(d, bool) or not d > 0
           for d in below):
        raise ValueError(f"below must be positive bit amounts, got {tuple(below)!r}")
    out: dict[str, dict] = {}
    seen: set = set()

    def add(label, over):
        k = _key(over)
        if k not in seen:
            seen.add(k)
            out[label] = over

    add("knapsack", allocate_bits(sensitivities, budget, choices, float_bits=float_bits))
    lightest = min(average_bits(sensitivities, uniform(sensitivities, c), float_bits=float_bits)
                   for c in choices)
    for d in below:
        if budget - d >= lightest - 1e-9:
            b = max(budget - d, lightest)
            add(f"knapsack@{budget - d:.3f}",
                allocate_bits(sensitivities, b, choices, float_bits=float_bits))
    for c in choices:
        u = uniform(sensitivities, c)
        if average_bits(sensitivities, u, float_bits=float_bits) <= budget + 1e-9:
            add(f"uniform {'float' if c is None else f'w{c}'}", u)
    for label, over in (extra or {}).items():
        if set(over) != set(sensitivities):
            raise ValueError(f"candidate {label!r} must give every layer of the sensitivities "
                             "(and no other)")
        avg = average_bits(sensitivities, over, float_bits=float_bits)
        if avg > budget + 1e-9:
            raise ValueError(f"candidate {label!r} is over the budget: {avg:.4f} > {budget} "
                             "bits per weight")
        add(label, dict(over))
    return out


def measure_loss(model: nn.Module, calibration, measure: str = "loss",
                 reference: list[torch.Tensor] | None = None) -> float:
    """The mean next-token cross-entropy of ``model`` over the calibration token tensors
    (each ``(T,)`` or ``(B, T)``; weighted by predicted tokens), or with ``measure="kl"`` the
    mean per-token ``KL(float || model)``, ``reference`` the float model's log-probabilities
    per tensor."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose from {MEASURES}")
    if measure == "kl" and (reference is None or len(reference) != len(calibration)):
        raise ValueError("measure='kl' needs reference: the float model's log-probabilities, "
                         "one tensor per calibration tensor")
    tot = n = 0.0
    with torch.no_grad():
        for i, x in enumerate(calibration):
            x = x.view(-1, x.shape[-1])
            if measure == "loss":
                k = x.shape[0] * (x.shape[1] - 1)
                tot += float(lm_loss(model, x)) * k
            else:
                out = model(x)
                lq = F.log_softmax((out if isinstance(out, torch.Tensor) else out.logits)
                                   .float(), -1)
                lp = reference[i]
                k = lp.shape[0] * lp.shape[1]
                tot += float((lp.exp() * (lp - lq)).sum())
            n += k
    return tot / n


def choose_allocation(model: nn.Module, config: BaseConfig, calibration, budget: float,
                      sensitivities: Mapping, choices: Sequence[int | None] = (2, 3, 4, 8, None),
                      below: Sequence[float] = (0.025, 0.05, 0.1), measure: str = "loss",
                      candidates: Mapping[str, Mapping] | None = None,
                      quant_calibration=None, float_bits: int = 16,
                      cache: dict | None = None, progress: bool = False) -> AllocationChoice:
    """Quantize ``model`` with each of :func:`candidate_allocations` (``budget``,
    ``choices``, ``below``, ``candidates`` as its ``extra``) through
    ``mixed_config(config, overrides)`` and ``quantize_model`` (``quant_calibration``: the
    calibration the method needs, e.g. GPTQ's; None for RTN), measure each on
    ``calibration`` (a list of int64 token id tensors; :func:`measure_loss`, ``measure``
    ``"loss"`` or ``"kl"``) and return the lowest as an :class:`AllocationChoice` (on a tie,
    the earlier candidate: the knapsack first). Never over ``budget``: every candidate is
    checked against it. Cost: one quantization and one calibration pass per candidate;
    ``cache`` (a dict the caller keeps between calls with the same model, config, calibration
    and measure) holds the measured values by allocation, so a candidate met again (a uniform
    one, or the same knapsack from another sensitivity) is not quantized again."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose from {MEASURES}")
    if not isinstance(config, BaseConfig):
        raise TypeError(f"config must be a qkern config, got {type(config).__name__}")
    if (isinstance(calibration, torch.Tensor) or not isinstance(calibration, Sequence)
            or not calibration or not all(isinstance(x, torch.Tensor) and x.dim() in (1, 2)
                                          for x in calibration)):
        raise TypeError("calibration must be a non-empty list of token id tensors ((T,) or "
                        "(B, T) int64, e.g. qkern.quantization.text_calibration(...))")
    if not isinstance(sensitivities, Mapping) or not all(
            isinstance(s, LayerSensitivity) for s in sensitivities.values()):
        raise TypeError("sensitivities must map layer names to LayerSensitivity "
                        "(qkern.mixed_precision.sensitivity)")
    cands = candidate_allocations(sensitivities, budget, choices, below, float_bits,
                                  candidates)
    ref = None
    if measure == "kl" and (cache is None or any(_key(o) not in cache for o in cands.values())):
        with torch.no_grad():
            ref = []
            for x in calibration:
                out = model(x.view(-1, x.shape[-1]))
                ref.append(F.log_softmax((out if isinstance(out, torch.Tensor) else out.logits)
                                         .float(), -1))
    losses, bits = {}, {}
    for label, over in tqdm(cands.items(), desc="candidates", disable=not progress):
        k = _key(over)
        if cache is None or k not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = quantize_model(model, mixed_config(config, over), quant_calibration,
                                   progress=False)
            v = measure_loss(q, calibration, measure, ref)
            if cache is not None:
                cache[k] = v
        losses[label] = v if cache is None else cache[k]
        bits[label] = average_bits(sensitivities, over, float_bits=float_bits)
        if not math.isfinite(losses[label]):
            raise ValueError(f"candidate {label!r} measured a non-finite {measure}")
    best = min(losses, key=lambda k: losses[k])  # first of equals: dict order
    return AllocationChoice(best, cands[best], losses, bits, cands)
