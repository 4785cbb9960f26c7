"""The calibration toolkit (public): what every data-driven method (bias correction, clip
search, SmoothQuant, AdaRound; GPTQ / AWQ next) runs on.

- batches: :func:`as_batches` (an iterable of model inputs as a list, checked),
  :func:`call_model` (one batch: a tensor, a tuple of positional inputs, a dict of keyword
  inputs or a :class:`~qkern.quantization.registry.Batch`), :func:`run_batches` (every batch,
  eval mode, no gradients, with forward hooks on named modules);
- order: :func:`execution_order` (layers in the order they first run);
- inputs: :func:`input_rows` (a layer input as the rows its weight matrix multiplies),
  :func:`capture_inputs` (all of a layer's input rows), :func:`capture_block_inputs` (the
  args / kwargs a block is called with, to replay through it);
- second moments: :class:`Gram` (a pre-hook accumulating ``X^T X``: the Hessian of the
  layer's output error), :func:`collect_grams`, :func:`paired_moments` (float vs quantized
  inputs of one layer);
- references: :func:`float_copy` (a prepared model without its calibration wrappers);
- :func:`sequential_calibration`: layer-by-layer calibration in execution order, each layer
  measured on the outputs of the already-quantized prefix.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import active, all_reduce_sum
from .layers import ObservedInput
from .registry import Batch, clone_inputs, replace_module

__all__ = ["FLOAT_LAYERS", "Gram", "as_batches", "call_model", "capture_block_inputs",
           "capture_inputs", "collect_grams", "execution_order", "float_copy", "input_rows",
           "paired_moments", "run_batches", "sequential_calibration", "sum_over_ranks",
           "weight_matrix"]

#: the float layers whose input rows / weight matrix the toolkit knows
FLOAT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


# ---- running calibration data --------------------------------------------------------------


def as_batches(calibration: Iterable) -> list:
    """``calibration`` (an iterable of model inputs) as a non-empty list."""
    if calibration is None:
        raise ValueError("calibration data is required: an iterable of model inputs")
    if isinstance(calibration, torch.Tensor):
        raise TypeError("calibration must be an iterable of batches (e.g. [x1, x2] or "
                        "x.split(64)), not one tensor")
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty: it yielded no batches")
    return batches


def call_model(model: nn.Module, batch) -> Any:
    """``model`` on one batch: a Batch (args + kwargs), a dict of keyword inputs, a tuple /
    list of positional inputs, or one input."""
    if isinstance(batch, Batch):
        return model(*batch.args, **batch.kwargs)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def run_batches(model: nn.Module, batches: Iterable,
                hooks: dict[str, tuple] | None = None) -> None:
    """Runs every batch through ``model`` (eval mode, no gradients; the training flag is
    restored after) with forward hooks: ``hooks`` maps a module name to
    ``(pre_hook, post_hook)`` (either may be None)."""
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
                call_model(model, b)
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


# ---- layer inputs ----------------------------------------------------------------------------


def input_rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
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


def capture_inputs(model: nn.Module, name: str, batches: Sequence) -> torch.Tensor:
    """Every calibration input of the float Linear / Conv ``name`` as weight-matrix rows
    (N, K)."""
    mod = model.get_submodule(name)
    if type(mod) not in FLOAT_LAYERS:
        raise ValueError(f"{name}: expected a float Linear / Conv, got {type(mod).__name__}")
    got: list[torch.Tensor] = []
    run_batches(model, batches, {name: (lambda m, a: got.append(input_rows(mod, a[0])), None)})
    if not got:
        raise ValueError(f"{name}: the layer did not run on the calibration data")
    return torch.cat(got)


def capture_block_inputs(model: nn.Module, name: str, batches: Sequence) -> list[Batch]:
    """The inputs (positional and keyword, detached copies) submodule ``name`` of ``model``
    is called with over the calibration batches, one :class:`Batch` per call: run them
    through the block (or a quantized version of it) with :func:`run_batches`."""
    block = model.get_submodule(name)
    got: list[Batch] = []

    def pre(mod, args, kwargs):
        got.append(Batch(clone_inputs(args), clone_inputs(kwargs)))

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        run_batches(model, batches)
    finally:
        handle.remove()
    if not got:
        raise ValueError(f"{name}: the block did not run on the calibration data")
    return got


# ---- second moments --------------------------------------------------------------------------


class Gram:
    """A pre-hook accumulating ``X^T X`` over a layer's input rows (float64, or ``dtype``);
    ``matrix()`` is its mean over rows."""

    def __init__(self, mod: nn.Module, dtype: torch.dtype = torch.float64):
        self.mod, self.h, self.n, self.dtype = mod, None, 0, dtype

    def __call__(self, module, args):
        r = input_rows(self.mod, args[0]).to(self.dtype)
        if self.h is None:
            self.h = r.T @ r
        else:  # in place: one (K, K) matrix less at the peak (the same sums, bit for bit)
            self.h += r.T @ r
        self.n += r.shape[0]

    def matrix(self) -> torch.Tensor:
        if self.h is None:
            raise ValueError("the layer did not run on the calibration data")
        return self.h / self.n


def sum_over_ranks(g: Gram) -> None:
    """In data-parallel calibration (:mod:`~qkern.quantization.distributed`), ``g``'s sum
    ``X^T X`` and row count become those of every rank's shard; a no-op otherwise."""
    if active() is None:
        return
    k = weight_matrix(g.mod).shape[1]
    h = g.h if g.h is not None else torch.zeros(k, k, dtype=g.dtype)
    n = int(all_reduce_sum(torch.tensor([g.n], dtype=torch.int64)))
    h = all_reduce_sum(h)
    g.h, g.n = (h, n) if n else (None, 0)


def collect_grams(model: nn.Module, names: Iterable[str], batches: Sequence,
                  dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """{name: X^T X / N} of each layer's calibration inputs (accumulated in float64, or in
    ``dtype``: float32 is enough where they only weigh the reported error)."""
    grams = {n: Gram(model.get_submodule(n), dtype) for n in names}
    run_batches(model, batches, {n: (g, None) for n, g in grams.items()})
    for g in grams.values():
        sum_over_ranks(g)
    out = {}
    for n, g in grams.items():
        if g.h is None:
            raise ValueError(f"{n}: the layer did not run on the calibration data")
        out[n] = g.matrix()
        g.h = None  # the sum is not needed once its mean is taken
    return out


def paired_moments(float_model: nn.Module, qmodel: nn.Module, name: str, batches: Sequence
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E[x^ x^^T], E[x^ x^T])`` over the input rows of layer ``name``: x from
    ``float_model``, x^ from ``qmodel`` (the same samples, batch by batch)."""
    fmod = float_model.get_submodule(name)
    rows: dict[str, torch.Tensor] = {}

    def grab(key):
        def hook(mod, args):
            rows[key] = input_rows(fmod, args[0]).double()
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


# ---- references and the layer-by-layer runner -------------------------------------------------


def float_copy(model: nn.Module) -> nn.Module:
    """A deep copy of a prepared model with the calibration wrappers taken out (the float
    reference for bias correction and AdaRound's targets)."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, ObservedInput):
            replace_module(ref, name, m.module)
    return ref


def sequential_calibration(model: nn.Module, names: Iterable[str], batches: Sequence,
                           finish: Callable[[int, str], None],
                           hooks: Callable[[list[str]], dict[str, tuple]] | None = None,
                           one_at_a_time: bool = True) -> list[str]:
    """Calibrates the layers ``names`` of ``model`` in execution order (on the first batch)
    and returns that order.

    With ``one_at_a_time`` every layer is a stage of its own, so layer i is measured on the
    outputs of layers 0..i-1 as ``finish`` left them (already quantized: GPTQ's and
    progressive calibration's rule); otherwise all layers form one stage, measured on the
    float model. Per stage: when ``hooks`` is given, the batches run through ``model`` once
    with ``hooks(stage)`` ({layer name: (pre_hook, post_hook)}, as :func:`run_batches`)
    attached; then ``finish(i, name)`` runs for each layer of the stage in order (i: the
    layer's position in the execution order), typically swapping in the quantized layer."""
    order = execution_order(model, list(names), batches)
    stages = [[n] for n in order] if one_at_a_time else [order]
    i = 0
    for stage in stages:
        if hooks is not None:
            run_batches(model, batches, hooks(stage))
        for n in stage:
            finish(i, n)
            i += 1
    return order
