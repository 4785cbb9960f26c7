"""What the block-by-block pipeline (:mod:`.sequential`) moves between blocks: block 0's
captured inputs, a block's outputs on its inputs, the next block's inputs, what a method sees of
a block (:class:`BlockContext`) and the per-layer report."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import call_model, collect_grams
from .registry import Batch, clone_inputs

__all__ = ["BlockContext", "LayerReport", "block_outputs", "capture_first_block_inputs",
           "relative_output_error", "with_hidden"]


class _Stop(Exception):
    """Raised by the capture hook: nothing after block 0 needs to run."""


def _no_cache(v):
    """Cache objects (transformers' Cache, qkern's KVCache) in block inputs -> None: the
    pipeline replays each block many times and must not grow a cache."""
    if type(v).__name__.endswith("Cache"):
        return None
    if isinstance(v, tuple):
        return tuple(_no_cache(x) for x in v)
    if isinstance(v, list):
        return [_no_cache(x) for x in v]
    if isinstance(v, dict):
        return {k: (False if k == "use_cache" else _no_cache(x)) for k, x in v.items()}
    return v


def _model_call(model: nn.Module, batch):
    """``model`` on one calibration batch, with ``use_cache=False`` where it takes one."""
    try:
        takes = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    if takes:
        if isinstance(batch, dict):
            batch = {"use_cache": False, **batch}
        elif isinstance(batch, Batch):
            batch = Batch(batch.args, {"use_cache": False, **batch.kwargs})
        else:
            args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
            batch = Batch(args, {"use_cache": False})
    return call_model(model, batch)


def capture_first_block_inputs(model: nn.Module, block: nn.Module, batches: list) -> list[Batch]:
    """The inputs ``block`` is called with, one :class:`Batch` per calibration batch; the
    model stops at the block (nothing after it runs)."""
    got: list[Batch] = []

    def pre(mod, args, kwargs):
        got.append(Batch(_no_cache(clone_inputs(args)), _no_cache(clone_inputs(kwargs))))
        raise _Stop

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    _model_call(model, b)
                except _Stop:
                    pass
    finally:
        handle.remove()
        model.train(was_training)
    if len(got) != len(batches):
        raise ValueError("the transformer blocks did not run on every calibration batch")
    return got


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def block_outputs(block: nn.Module, inputs: list[Batch]) -> list[torch.Tensor]:
    """The hidden states ``block`` returns on each input."""
    with torch.no_grad():
        return [_hidden(call_model(block, b)) for b in inputs]


def with_hidden(batch: Batch, h: torch.Tensor) -> Batch:
    if batch.args:
        return Batch((h, *batch.args[1:]), batch.kwargs)
    if "hidden_states" in batch.kwargs:
        return Batch((), {**batch.kwargs, "hidden_states": h})
    raise ValueError("cannot find the hidden states among the block's inputs")


def relative_output_error(w: torch.Tensor, wq: torch.Tensor, gram: torch.Tensor | None) -> float:
    """``E||(W - Wq) x||^2 / E||W x||^2`` for inputs with second moment ``gram`` (the weight
    MSE ratio when ``gram`` is None)."""
    w, d = w.double(), (w.double() - wq.double())
    if gram is None:
        return float((d * d).sum() / (w * w).sum().clamp_min(1e-300))
    g = gram.double()
    return float(((d @ g) * d).sum() / ((w @ g) * w).sum().clamp_min(1e-300))


@dataclass
class LayerReport:
    """One quantized layer: its name, relative output error, seconds, and a note."""
    name: str
    error: float
    seconds: float
    note: str = ""


@dataclass
class BlockContext:
    """What a method sees of one block: ``block`` (the float copy being quantized, modules
    named relative to it), ``inputs`` (its calibration inputs; empty without data),
    ``layers`` {relative linear name: its config} to quantize, ``groups`` (true-sequential
    order), ``pairs`` (foldable (op, linears) pairs: :func:`~.blocks.scale_pairs`)."""
    name: str
    index: int
    count: int
    block: nn.Module
    inputs: list[Batch]
    layers: dict[str, object]
    groups: list[list[str]]
    pairs: list[tuple[str, list[str]]]
    notes: dict[str, str] = field(default_factory=dict)
    _float_out: list[torch.Tensor] | None = None

    @property
    def float_outputs(self) -> list[torch.Tensor]:
        """The float block's outputs on ``inputs`` (computed on first use: read it before
        changing the block)."""
        if self._float_out is None:
            self._float_out = block_outputs(self.block, self.inputs)
        return self._float_out

    def outputs(self) -> list[torch.Tensor]:
        """The block's outputs on ``inputs`` as it is now."""
        return block_outputs(self.block, self.inputs)

    def grams(self, names: list[str], dtype: torch.dtype = torch.float64
              ) -> dict[str, torch.Tensor]:
        """{name: X^T X / N} of the named linears' inputs, running the block as it is now
        (accumulated in ``dtype``)."""
        if not self.inputs:
            return {}
        return collect_grams(self.block, names, self.inputs, dtype)

    def full_name(self, rel: str) -> str:
        return f"{self.name}.{rel}"
