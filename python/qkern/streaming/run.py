"""``qkern.quantize_pretrained``: an LLM method run over a checkpoint folder block by block,
from disk to disk, holding one float block (and one block's calibration activations) at a
time. docs/streaming.md describes it."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..hf import QkernConfig
from ..io.safetensors import atomic_write
from ..io.serialization import layer_specs
from ..io.shards import Checkpoint, write_streamed
from ..quantization import BaseConfig, find_blocks, quantizer_for
from ..quantization.blocks import block_linears
from ..quantization.calibration import as_batches
from ..quantization.layers import warn_notes
from ..quantization.sequential import (
    BlockLog,
    LayerReport,
    SequentialQuantizer,
    capture_first_block_inputs,
    next_block_inputs,
    preflight_block,
    quantize_block_copy,
)
from .activations import ActivationStore
from .checkpoint import free_params, load_on_call, load_params, skeleton
from .output import OutFolder, calibration_digest

__all__ = ["StreamResult", "quantize_pretrained"]


@dataclass
class StreamResult:
    """What :func:`quantize_pretrained` did: ``path`` (the checkpoint folder), ``report``
    (one :class:`LayerReport` per quantized layer, those of a resumed run's earlier blocks
    included), ``resumed_from`` (the first block this call quantized; the block count when
    the folder was finished already), ``offloaded`` (whether the activations went to disk),
    ``skipped`` ({layer: why it stayed float})."""
    path: Path
    report: list[LayerReport] = field(default_factory=list)
    resumed_from: int = 0
    offloaded: bool = False
    skipped: dict[str, str] = field(default_factory=dict)


def _check_args(config, memory_limit, resume) -> SequentialQuantizer:
    if not isinstance(config, BaseConfig):
        raise TypeError(f"config must be a qkern config (e.g. qkern.GPTQConfig(bits=4)), got "
                        f"{type(config).__name__}")
    quantizer = quantizer_for(config)
    if not isinstance(quantizer, SequentialQuantizer):
        raise ValueError(f"quantize_pretrained runs the block-by-block LLM methods (RTN, GPTQ, "
                         f"AWQ, ...); {type(config).__name__} is not one: load the model and "
                         "use qkern.quantize_model")
    if memory_limit is not None and (isinstance(memory_limit, bool)
                                     or not isinstance(memory_limit, int) or memory_limit < 0):
        raise ValueError(f"memory_limit must be None or a number of bytes >= 0, got "
                         f"{memory_limit!r}")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    return quantizer


def _outside(model: nn.Module, list_name: str) -> dict[str, torch.Tensor]:
    """The model's state dict outside the blocks (keep_vars: meta parameters, real buffers),
    a tensor tied to an earlier one left out (transformers' save_pretrained writes a tied
    LM head once, as the embedding)."""
    out, seen = {}, set()
    for k, t in model.state_dict(keep_vars=True).items():
        if k.startswith(list_name + ".") or t is None:
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[k] = t
    return out


def _write_outside(out: OutFolder, model: nn.Module, list_name: str, ckpt: Checkpoint,
                   m: dict) -> None:
    """Shard 0: the float tensors outside the blocks, copied from the checkpoint (float32)
    one at a time; the manifest records it."""
    tensors = _outside(model, list_name)
    specs = {}
    for k, t in tensors.items():
        if isinstance(t, nn.Parameter) and k not in ckpt:
            raise ValueError(f"{ckpt.folder}: the checkpoint has no tensor {k!r}")
        specs[k] = (torch.float32 if t.is_floating_point() else t.dtype, tuple(t.shape))

    def get(k: str) -> torch.Tensor:
        t = tensors[k]
        if k in ckpt:
            t = ckpt.read(k)
        return t.float() if t.is_floating_point() else t

    name = out.shard(0)
    m["total_size"] += write_streamed(out.path / name, specs, get, {"format": "pt"},
                                      overwrite=True)
    m["weight_map"].update({k: name for k in specs})
    m["outside"] = True
    out.write_manifest(m)


def _write_block(out: OutFolder, i: int, prefix: str, blk: nn.Module, m: dict) -> None:
    state = {f"{prefix}{k}": v for k, v in blk.state_dict().items() if v is not None}
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    name = out.shard(i + 1)
    m["total_size"] += write_streamed(out.path / name, specs, state.__getitem__,
                                      {"format": "pt"}, overwrite=True)
    m["weight_map"].update({k: name for k in state})
    m["layers"].update({f"{prefix}{k}": v for k, v in layer_specs(blk).items()})


def _finish(out: OutFolder, model: nn.Module, model_dir: Path, config: BaseConfig,
            m: dict) -> None:
    """The index, generation_config.json and config.json (last: it marks a finished folder)."""
    import transformers  # optional dependency (the qkern[hf] extra)

    out.write_index(m)
    tmp = out.work / "final"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if (model_dir / "generation_config.json").is_file():
        gen = transformers.GenerationConfig.from_pretrained(str(model_dir))
        gen.save_pretrained(str(tmp))
    elif model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(tmp))
    cfg = copy.deepcopy(model.config)
    cfg.quantization_config = QkernConfig(config, layers=dict(sorted(m["layers"].items())))
    cfg.save_pretrained(str(tmp))
    for name in ("generation_config.json", "config.json"):
        if (tmp / name).is_file():
            text = (tmp / name).read_text()
            atomic_write(out.path / name, lambda p, text=text: Path(p).write_text(text),
                         overwrite=True)
    m["finished"] = True
    out.write_manifest(m)
    shutil.rmtree(out.work, ignore_errors=True)


def _report(m: dict) -> list[LayerReport]:
    return [LayerReport(**r) for r in m["report"]]


def quantize_pretrained(model_dir: str | os.PathLike, config: BaseConfig,
                        out_dir: str | os.PathLike, calibration: Iterable | None = None,
                        memory_limit: int | None = None, resume: bool = True,
                        progress: bool | None = None,
                        on_block: Callable[[int], None] | None = None) -> StreamResult:
    """Quantizes the float transformers checkpoint in ``model_dir`` with the LLM method of
    ``config`` (GPTQ, RTN, AWQ, ...) block by block from disk to disk, and writes the
    quantized checkpoint folder ``out_dir`` (qkern's format, sharded: it loads with
    ``qkern.from_pretrained`` / transformers after ``import qkern``).

    The model is built with its parameters on the meta device; each block's weights are
    read from the safetensors shards, the block is quantized by the same per-block step as
    ``qkern.quantize_model`` (:func:`~qkern.quantization.sequential.quantize_block_copy`, so
    the result is the same bit for bit), written as its own shard and freed.
    ``calibration``: as for ``quantize_model``. ``memory_limit``: bytes of one block's
    calibration activations kept in memory; past it they go to files in ``out_dir`` and are
    read back one batch at a time (None: always in memory). ``resume``: go on from the first
    block a killed run did not finish (the block inputs are checkpointed after each block);
    False starts over. ``progress``: a bar over blocks and one line per layer (default:
    when stderr is a terminal). ``on_block(i)`` runs after block ``i`` is written and
    recorded (raising from it stops the run; a later call resumes after block ``i``)."""
    quantizer = _check_args(config, memory_limit, resume)
    model_dir = Path(model_dir)
    model = skeleton(model_dir)
    ckpt = Checkpoint(model_dir)
    list_name, blocks = find_blocks(model)
    batches = None if calibration is None else as_batches(calibration)
    why = quantizer.needs_calibration()
    if why and batches is None:
        raise ValueError(f"{type(config).__name__} needs calibration data (it {why}): pass "
                         "calibration=[token ids (1, L), ...]")
    if progress is None:
        progress = sys.stderr.isatty()
    quantizer.progress = progress
    cannot = preflight_block(quantizer, list_name, blocks[0])  # on the meta block: shapes only
    n = len(blocks)
    out = OutFolder(Path(out_dir), n)
    expect = json.loads(json.dumps({
        "config": config.to_dict(), "checkpoint": ckpt.fingerprint(), "blocks": n,
        "calibration": None if batches is None else calibration_digest(batches)}))
    m = out.prepare(resume, expect)
    quantizer.notes.update(m["notes"])
    quantizer.skipped.update(m["skipped"])
    if m["finished"]:
        return StreamResult(out.path, _report(m), n, False, dict(m["skipped"]))
    if not m.get("outside"):
        _write_outside(out, model, list_name, ckpt, m)
    start = len(m["done"])
    carries = [type(q.config).__name__ for q in quantizer.chain() if q.cross_block_state()]
    if start and carries:
        raise ValueError(f"{carries[0]} carries state from block to block, which a stopped run "
                         f"does not keep: {out.path} stopped after block {start - 1} cannot be "
                         "resumed exactly; pass resume=False to start over")
    store = _first_inputs(model, list_name, blocks[0], ckpt, batches, out, start,
                          memory_limit)
    offloaded = store.offloaded
    log = BlockLog(quantizer.notes, n, sum(len(block_linears(b)) for b in blocks), progress,
                   done_blocks=start, done_layers=len(m["report"]))
    try:
        for i in range(start, n):
            prefix = f"{list_name}.{i}."
            blk = copy.deepcopy(blocks[i])  # meta parameters: nothing copied
            load_params(blk, prefix, ckpt)
            nxt = ActivationStore(out.inputs_dir(i + 1), memory_limit, checkpoint=resume)

            def advance(block, inputs, nxt=nxt):
                for b in inputs:  # one batch at a time: the store may send it to disk
                    nxt.append(next_block_inputs(block, [b])[0])
                return nxt

            before = len(log.report)
            res = quantize_block_copy(quantizer, list_name, i, n, blk, store, cannot, log,
                                      advance)
            _write_block(out, i, prefix, blk, m)
            del blk
            m["done"].append(i)
            m["report"] += [dataclasses.asdict(r) for r in log.report[before:]]
            m["notes"], m["skipped"] = dict(quantizer.notes), dict(quantizer.skipped)
            out.write_manifest(m)  # block i is committed
            if res is nxt:
                store.remove()
                store = nxt
                offloaded = offloaded or nxt.offloaded
            log.block_done()
            if on_block is not None:
                on_block(i)
    finally:
        log.close()
    store.remove()
    _finish(out, model, model_dir, config, m)
    if quantizer.notes:
        warn_notes(quantizer.notes)
    quantizer.warn_skipped()
    return StreamResult(out.path, _report(m), start, offloaded, dict(m["skipped"]))


def _first_inputs(model: nn.Module, list_name: str, block0: nn.Module, ckpt: Checkpoint,
                  batches: list | None, out: OutFolder, start: int,
                  memory_limit: int | None) -> ActivationStore:
    """Block ``start``'s inputs: block 0's captured from the model (only the modules that run
    before it read from the checkpoint, freed after), or a resumed run's checkpoint."""
    if batches is None:
        return ActivationStore(None)
    if start > 0:
        return ActivationStore.open(out.inputs_dir(start), len(batches), memory_limit)
    store = ActivationStore(out.inputs_dir(0), memory_limit)
    handles = load_on_call(model, list_name, ckpt)
    try:
        for b in batches:  # one at a time: the store may send it to disk
            for x in capture_first_block_inputs(model, block0, [b]):
                store.append(x)
    finally:
        for h in handles:
            h.remove()
        free_params(model)
    return store
