"""``prepare`` / ``convert`` / ``quantize_model``: the workflow around a registered
:class:`~qkern.quantization.registry.Quantizer` (found by the config's type)."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterable

from torch import nn

from ..models import load_pretrained
from ..nn import notify_quantized, on_quantized
from .blocks import linearize_conv1d
from .calibration import run_batches
from .registry import BaseConfig, Batch, quantizer_for
from .sequential import SequentialQuantizer, quantize_sequential

__all__ = ["convert", "notify_quantized", "on_quantized", "prepare", "quantize_model",
           "run_calibration"]

_STATE = "_qkern_state"


def run_calibration(model: nn.Module, calibration: Iterable, progress: bool = False) -> int:
    """Runs every batch (a tensor, a tuple of positional inputs or a dict of keyword inputs)
    through ``model`` without gradients; returns the number of batches."""
    n = 0

    def counted():
        nonlocal n
        for n, batch in enumerate(calibration, 1):
            yield batch
            if progress and (n & (n - 1) == 0 or n % 50 == 0):
                print(f"qkern: calibrated on {n} batch(es)", file=sys.stderr, flush=True)

    run_batches(model, counted())
    return n


def prepare(model: nn.Module, quant_config: BaseConfig, args=None, kwargs=None,
            inplace: bool = False) -> nn.Module:
    """Readies ``model`` for ``quant_config``: selects its layers and inserts observers where
    the method needs activation statistics. With example inputs (``args`` a tuple or a
    tensor, ``kwargs`` a dict) it runs them once. Works on a copy unless ``inplace=True``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    quantizer = quantizer_for(quant_config)
    if getattr(model, _STATE, None) is not None:
        raise ValueError("this model is already prepared; call qkern.convert(model, config)")
    target = model if inplace else copy.deepcopy(model)
    linearize_conv1d(target)  # GPT-2's transformers Conv1D -> the equivalent nn.Linear
    quantizer.prepare(target)
    if quantizer.records_inputs():
        quantizer.record_handle = target.register_forward_pre_hook(quantizer.record,
                                                                   with_kwargs=True)
    object.__setattr__(target, _STATE, quantizer)  # not a submodule, not in the state dict
    if args is not None or kwargs is not None:
        a = tuple(args) if isinstance(args, (tuple, list)) else (() if args is None else (args,))
        run_calibration(target, [Batch(a, dict(kwargs or {}))])
    return target


def convert(model: nn.Module, quant_config: BaseConfig | None = None) -> nn.Module:
    """Turns a prepared (and, for static methods, calibrated) model into its quantized form,
    in place on the prepared model, which it returns."""
    quantizer = getattr(model, _STATE, None)
    if quantizer is None:
        raise ValueError("convert() needs a prepared model: call qkern.prepare(model, config) "
                         "first (and run calibration data through it for static methods), or "
                         "use qkern.quantize_model(model, config, calibration)")
    if quant_config is not None and quant_config != quantizer.config:
        raise ValueError(f"the model was prepared with {quantizer.config!r}, not "
                         f"{quant_config!r}")
    hook = getattr(quantizer, "record_handle", None)
    if hook is not None:  # convert() re-runs the recorded batches: stop recording
        hook.remove()
    why = quantizer.needs_calibration()
    if why and not quantizer.calibrated(model):
        raise ValueError(f"{type(quantizer.config).__name__} {why}, but the prepared model has "
                         "seen no data: run sample inputs through it before convert(), or pass "
                         "calibration= to qkern.quantize_model")
    quantizer.convert(model)
    object.__delattr__(model, _STATE)
    quantizer.warn_skipped()
    model.qkern_config = quantizer.config  # plain attribute: read by qkern.save
    return notify_quantized(model)


def quantize_model(model: nn.Module | str | os.PathLike, quant_config: BaseConfig,
                   calibration: Iterable | None = None, inplace: bool = False,
                   progress: bool | None = None, distributed: bool | None = None
                   ) -> nn.Module:
    """``prepare`` + calibration + ``convert`` in one call. ``model``: an nn.Module, or the
    path of a local transformers model folder (loaded in float32 with
    :func:`qkern.models.load_pretrained`, then quantized in place). ``calibration``: an
    iterable of inputs (tensors, tuples of positional inputs, or dicts of keyword inputs).

    The LLM methods (GPTQ, AWQ, RTN ...: :class:`SequentialQuantizer`) run block by block
    instead, holding one float block at a time: the result shares nothing with ``model``
    (unless ``inplace``), and ``progress`` (default: when stderr is a terminal) shows a bar
    over blocks and one line per layer. ``distributed``: run them data- and layer-parallel
    over the torch.distributed process group (None: automatically when one with several
    ranks is initialized; docs/distributed.md); every rank gets the same quantized model."""
    quantizer = quantizer_for(quant_config)
    if isinstance(model, (str, os.PathLike)):  # a local transformers model folder
        model, inplace = load_pretrained(model), True
    if isinstance(quantizer, SequentialQuantizer):
        quantizer.progress = progress
        out = quantize_sequential(model, quantizer, calibration, inplace=inplace,
                                  progress=progress, distributed=distributed)
        quantizer.warn_skipped()
        out.qkern_config = quant_config
        out.qkern_report = quantizer.report
        return notify_quantized(out)
    if distributed:
        raise ValueError(f"{type(quant_config).__name__}: distributed=True runs the LLM "
                         "(block-by-block) methods; for observer-based static methods calibrate "
                         "each rank's shard, then call qkern.quantization.distributed."
                         "sync_observers(prepared) before convert")
    why = quantizer.needs_calibration()
    if why and calibration is None:
        raise ValueError(f"{type(quant_config).__name__} needs calibration data (it {why}): pass "
                         "calibration=[batch, ...] (a few hundred samples of real inputs)")
    prepared = prepare(model, quant_config, inplace=inplace)
    if calibration is not None:
        if run_calibration(prepared, calibration, bool(progress)) == 0 and why:
            raise ValueError("calibration is empty: it yielded no batches")
    return convert(prepared)
