"""The block-by-block pipeline of the LLM methods (GPTQ, AWQ, SmoothQuant, OmniQuant, HQQ,
RTN, rotations ...), and :class:`SequentialQuantizer`, their base class.

For each transformer block (found by :func:`~qkern.quantization.blocks.find_blocks`), in order:

1. the block's inputs (positional and keyword arguments, one :class:`Batch` per calibration
   batch) are at hand: block 0's captured from the model, block i+1's produced by running the
   *quantized* block i on block i's inputs;
2. a float copy of the block is made (the model is never held twice: one block at a time;
   where no method transforms whole blocks, the linears' weights are shared with the
   original and each layer gets its own copy only while it is quantized);
3. ``quantizer.process_block(ctx)`` may transform it (scale folding, rotations, training);
4. ``quantizer.quantize_block(ctx)``: by default, for each true-sequential group of linears
   (q/k/v, then o, then gate/up, then down), the Gram matrices ``X^T X / N`` of their inputs
   are collected on the partially quantized block and ``quantize_layer`` builds each
   quantized layer; one log line per layer gives its relative output error and time;
5. the quantized block replaces the original, and runs to give the next block's inputs.

Only one block's activations are alive at a time. Without ``inplace`` the user's model is
never modified (an interrupt leaves it as it was); with ``inplace`` the blocks finished so far
are quantized.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from .block_io import (
    BlockContext,
    LayerReport,
    block_outputs,
    capture_first_block_inputs,
    relative_output_error,
    with_hidden,
)
from .blocks import block_linears, find_blocks, linearize_conv1d, scale_pairs, sequential_groups
from .calibration import as_batches
from .distributed import DataParallel, data_parallel, mine, resolve, shard, share_modules
from .layers import warn_notes, weight_module
from .registry import (
    BaseConfig,
    Batch,
    Quantizer,
    check_bool,
    check_group,
    check_int,
    fail,
    matches,
    quantizer_for,
    replace_module,
)

__all__ = ["BlockContext", "BlockLog", "LayerReport", "SequentialQuantizer", "block_outputs",
           "capture_first_block_inputs", "check_weight_bits", "next_block_inputs",
           "preflight_block", "quantize_block_copy", "quantize_sequential",
           "relative_output_error"]


class SequentialQuantizer(Quantizer):
    """Base of the block-by-block methods. Subclasses set ``GRAMS`` / ``NEEDS_DATA`` and
    override :meth:`quantize_layer` (and, if they need the whole block, :meth:`process_block`
    or :meth:`quantize_block`). Their configs have ``bits``, ``group_size`` and ``sym``."""

    SUPPORTED = (nn.Linear,)
    #: quantize_layer gets the Gram matrix of the layer's inputs
    GRAMS = True
    #: convert needs calibration data
    NEEDS_DATA = True
    #: runs data-parallel (distributed=True): every statistic it uses is all-reduced
    DISTRIBUTED = True
    #: why not, when DISTRIBUTED is False (the error's words)
    NOT_DISTRIBUTED = "its statistics are not all-reduced"
    #: applies ``cfg.constraints`` (RTN's round to nearest does, through ``rtn_layer``; a
    #: subclass with its own grid sets it when its grid goes through constraints.grid_params)
    APPLIES_CONSTRAINTS = False
    #: why this method refuses constraints (None: the generic hint)
    CONSTRAINTS_REFUSAL: str | None = None

    def __init__(self, config):
        super().__init__(config)
        self.report: list[LayerReport] = []
        self.notes: dict[str, str] = {}
        self.progress: bool | None = None
        then = getattr(config, "then", None)
        #: the layer quantizer a transform hands its layers to (``config.then``)
        self.inner: SequentialQuantizer | None = None
        if then is not None:
            inner = quantizer_for(then)
            if not isinstance(inner, SequentialQuantizer):
                raise ValueError(f"{type(config).__name__}.then must be an LLM method config "
                                 f"(RTNConfig, GPTQConfig, ...), got {type(then).__name__}")
            inner.notes = self.notes
            self.inner = inner

    def chain(self) -> list[SequentialQuantizer]:
        """This quantizer and the ones it hands over to (``then``), outermost first."""
        out, q = [], self
        while q is not None:
            out.append(q)
            q = q.inner
        return out

    def float_inputs(self) -> bool:
        """True when each block is calibrated on the float model's activations (the previous
        blocks transformed but not quantized, as llm-awq searches) instead of the quantized
        prefix's (GPTQ's rule, the default)."""
        return getattr(self.config, "inputs", "quantized") == "float"

    def not_distributed(self) -> str | None:
        """Why this quantizer (its config) cannot run data-parallel; None: it can."""
        return None if self.DISTRIBUTED else self.NOT_DISTRIBUTED

    def wants_grams(self) -> bool:
        return any(q.GRAMS for q in self.chain())

    def cross_block_state(self) -> bool:
        """True when the method carries state from one block to the next (OmniQuant's
        float-model targets): a streamed run cannot then resume part way."""
        return False

    # ---- hooks ---------------------------------------------------------------------------

    def layer_format(self, cfg) -> str:
        return f"int{cfg.bits}"

    def group_for(self, name: str, cfg, k: int) -> int | None:
        """The group size layer ``name`` (input size ``k``) is stored with. qkern's int2-4
        kernels take groups of a multiple of 32 along K: per output channel
        (``group_size=None``) is one group of K there, and a group size that does not
        divide K falls back to that (noted). Otherwise ``cfg.group_size``."""
        g = cfg.group_size
        if cfg.bits > 4 or k % 32:
            return g
        if g is not None and k % g:
            self.notes[name] = (f"group_size {g} does not divide its input size {k}: "
                                "quantized per output channel")
            g = None
        return k if g is None else g

    def rtn_layer(self, name: str, linear: nn.Linear, cfg) -> nn.Module:
        """``linear`` rounded to nearest on ``cfg``'s grid (bits, group, sym)."""
        g = self.group_for(name, cfg, linear.in_features)
        return weight_module(linear, self.layer_format(cfg), g, self.notes, name,
                             symmetric=cfg.sym, constraints=cfg.constraints)

    def check_constraints(self, cfg, name: str) -> None:
        """ValueError when ``cfg.constraints`` (of layer ``name``) cannot be applied: this
        method does not apply them (``APPLIES_CONSTRAINTS`` False), or per-tensor scales /
        an accumulator bound come with a ``group_size`` (they need one scale per row or per
        layer: ``group_size=None``)."""
        c = cfg.constraints
        if c is None:
            return
        n = type(cfg).__name__
        if not self.APPLIES_CONSTRAINTS:
            raise ValueError(f"{n} does not apply hardware constraints (layer {name}): "
                             f"{self.CONSTRAINTS_REFUSAL or CONSTRAINTS_HINT}")
        if cfg.group_size is not None and (c.per_tensor or c.accumulator_bits is not None):
            what = "per_tensor" if c.per_tensor else "accumulator_bits"
            raise ValueError(f"{n}(group_size={cfg.group_size}) with {what} hardware "
                             f"constraints (layer {name}): {what} needs one scale per "
                             f"{'layer' if c.per_tensor else 'output channel'}; "
                             "set group_size=None")

    def quantize_layer(self, name: str, linear: nn.Linear, gram: torch.Tensor | None,
                       cfg) -> nn.Module:
        """The quantized twin of ``linear`` (round to nearest by default). ``gram``:
        ``X^T X / N`` (K, K) float64 of its calibration inputs (None when ``GRAMS`` is False
        or there is no data); notes for the end-of-run warning go to ``self.notes``. A
        transform with ``then`` hands the layer to that method."""
        if self.inner is not None:
            return self.inner.quantize_layer(name, linear, gram, self.inner.config)
        return self.rtn_layer(name, linear, cfg)

    def preflight(self, name: str, linear: nn.Linear, cfg) -> str | None:
        """Why ``cfg`` cannot run on ``linear``'s shape on one of qkern's fused kernels
        (checked on a random weight of that shape before any work starts); None when it can.
        Such layers stay float, reported once."""
        probe = nn.Linear(linear.in_features, linear.out_features, bias=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                q = self.rtn_layer(name, probe, cfg)
            except ValueError as e:
                return str(e)
        why = getattr(q, "kernel_reason", None)
        return None if why is None else f"no fused kernel runs it ({why})"

    def process_block(self, ctx: BlockContext) -> None:
        """Runs before the block's layers are quantized (scale folding, rotations ...)."""

    def quantize_block(self, ctx: BlockContext, log) -> None:
        """Quantizes ``ctx.layers`` group by group (true-sequential)."""
        for group in ctx.groups:
            todo = [n for n in group if n in ctx.layers]
            if not todo:
                continue
            # a method without Gram matrices gets them only to weigh the reported error:
            # float32 is enough there (float64 took a fifth of RTN / ZeroQuant / rotation)
            want = self.wants_grams()
            grams = ctx.grams(todo, torch.float64 if want else torch.float32)
            made = {}
            for i, rel in enumerate(todo):  # layer-parallel over ranks (one rank: all)
                if mine(i):
                    t0 = time.perf_counter()
                    lin = ctx.block.get_submodule(rel)
                    # the layer gets its own copy of the weight to quantize (a method may
                    # write it); the block's tensor (perhaps shared with the user's model)
                    # stays as it was and is the reference of the reported error
                    w = lin.weight.detach().float()
                    lin.weight = nn.Parameter(lin.weight.detach().clone(),
                                              requires_grad=lin.weight.requires_grad)
                    g = grams.get(rel)
                    full = ctx.full_name(rel)
                    new = self.quantize_layer(full, lin, g if want else None, ctx.layers[rel])
                    deq = getattr(new, "dequantize_weight", None)
                    err = relative_output_error(w, deq(), g) if deq is not None else float("nan")
                    made[rel] = (new, self.notes.get(full), err, time.perf_counter() - t0)
            made = share_modules(made, todo)  # each owner's modules to every rank
            for rel in todo:
                new, note, err, seconds = made[rel]
                full = ctx.full_name(rel)
                if note is not None:
                    self.notes[full] = note
                replace_module(ctx.block, rel, new)
                log(full, err, seconds)

    # ---- the workflow --------------------------------------------------------------------

    def needs_calibration(self) -> str | None:
        if any(q.NEEDS_DATA for q in self.chain()):
            return "measures layer inputs on calibration data"
        return None

    def records_inputs(self) -> bool:
        return True

    def calibrated(self, model: nn.Module) -> bool:
        return bool(self.batches) or self.needs_calibration() is None

    def select(self, model: nn.Module) -> None:
        pass  # layers are chosen block by block (after GPT-2's Conv1D -> Linear)

    def layer_config(self, name: str, mod: nn.Module):
        """The config of block linear ``name`` (None: keep it float)."""
        cfg = self.config
        if cfg.include is not None and not matches(name, mod, cfg.include):
            return None
        if matches(name, mod, cfg.exclude):
            return None
        layer_cfg = cfg.for_layer(name)
        if layer_cfg is not None:
            for q in self.chain():
                q.check_constraints(layer_cfg if q is self else q.config, name)
            inner = self.inner
            if (inner is not None and layer_cfg.constraints is not None
                    and inner.config.constraints != layer_cfg.constraints):
                raise ValueError(f"{type(layer_cfg).__name__}.then: {type(inner.config).__name__}"
                                 " must carry the same constraints (it quantizes the layers); "
                                 f"got {inner.config.constraints} vs {layer_cfg.constraints}")
        return layer_cfg

    def convert(self, model: nn.Module) -> None:
        quantize_sequential(model, self, self.batches or None, inplace=True)


CONSTRAINTS_HINT = ("the LLM methods that do are RTNConfig, GPTQConfig, AWQConfig, HQQConfig, "
                    "OmniQuantConfig, ZeroQuantConfig, SmoothQuantConfig and RotationConfig "
                    "(WeightOnlyConfig, StaticConfig, DynamicConfig outside the pipeline); "
                    "or pass constraints=None (docs/hardware.md)")


def _check_model(model: nn.Module) -> None:
    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and p.device.type != "cpu":
            raise ValueError(f"{n} is on {p.device}: the sequential pipeline runs on the CPU; "
                             "move the model with model.cpu()")
        if p.is_floating_point() and p.dtype != torch.float32:
            raise ValueError(f"{n} is {p.dtype}: qkern quantizes float32 models; convert "
                             "with model.float() first")


def preflight_block(quantizer: SequentialQuantizer, list_name: str, block: nn.Module
                    ) -> dict[str, str]:
    """{relative linear name: why it stays float} for block 0 (every block has the same
    shapes); raises ValueError when no selected layer can be quantized."""
    first = copy.deepcopy(block)
    linearize_conv1d(first)
    cannot, chosen = {}, 0
    for rel in block_linears(first):
        mod = first.get_submodule(rel)
        cfg = quantizer.layer_config(f"{list_name}.0.{rel}", mod)
        if cfg is None:
            continue
        chosen += 1
        why = quantizer.preflight(f"{list_name}.0.{rel}", mod, cfg)
        if why is not None:
            cannot[rel] = why
    if chosen and len(cannot) == chosen:
        c = quantizer.config
        raise ValueError(f"{type(c).__name__}(bits={c.bits}, group_size={c.group_size}): no "
                         f"layer of the model can take it: {next(iter(cannot.values()))}; "
                         "choose another bits / group_size (see docs/llm.md)")
    return cannot


def _check_distributed(quantizer: SequentialQuantizer, dp: DataParallel | None) -> None:
    bad = [(type(q.config).__name__, q.not_distributed()) for q in quantizer.chain()]
    bad = [b for b in bad if b[1] is not None]
    if dp is not None and bad:
        raise ValueError(f"{bad[0][0]} does not run distributed ({bad[0][1]}): run it in one "
                         "process (distributed=False); GPTQ, RTN, AWQ, SmoothQuant, HQQ, "
                         "ZeroQuant, VQ without fine-tuning and the rotations do "
                         "(docs/distributed.md)")


def _shared_copy(model: nn.Module, blocks: nn.ModuleList) -> nn.Module:
    """A deep copy of ``model`` whose blocks share their tensors with the original (each is
    copied for real, one at a time, when it is quantized)."""
    memo = {id(t): t for t in list(blocks.parameters()) + list(blocks.buffers())}
    return copy.deepcopy(model, memo)


def _block_copy(block: nn.Module, quantizer: SequentialQuantizer) -> nn.Module:
    """The float copy of ``block`` that is transformed and quantized. Where no method of the
    chain transforms blocks (no ``process_block`` / ``quantize_block`` of its own: RTN, HQQ,
    GPTQ ...), the linears' weights are shared with ``block``, not copied: the default
    ``quantize_block`` gives each layer its own copy only while it quantizes it (copy on
    write), so the whole block's float weights are never held twice."""
    if any(type(x).process_block is not SequentialQuantizer.process_block
           or type(x).quantize_block is not SequentialQuantizer.quantize_block
           for x in quantizer.chain()):
        return copy.deepcopy(block)
    memo = {}
    for rel in block_linears(block):
        w = getattr(block.get_submodule(rel), "weight", None)
        if isinstance(w, nn.Parameter):
            memo[id(w)] = w
    return copy.deepcopy(block, memo)


def _unshare(copied: nn.Module, original: nn.Module) -> None:
    """Gives the parameters ``copied`` still shares with ``original`` (layers left float)
    copies of their own: the result shares no tensor with the user's model."""
    theirs = {id(p) for p in original.parameters()}
    for mod in copied.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and id(p) in theirs:
                mod._parameters[name] = nn.Parameter(p.detach().clone(),
                                                     requires_grad=p.requires_grad)


def next_block_inputs(block: nn.Module, inputs: Sequence[Batch]) -> list[Batch]:
    """The next block's inputs: ``inputs`` with their hidden states replaced by ``block``'s
    outputs on them."""
    return [with_hidden(b, h) for b, h in zip(inputs, block_outputs(block, inputs))]


class BlockLog:
    """The per-layer log of a run, ``log(name, error, seconds)``: ``report`` (a LayerReport per
    layer), and with ``progress`` a bar over blocks and one line per layer on stderr."""

    def __init__(self, notes: dict[str, str], n_blocks: int, n_layers: int, progress: bool,
                 done_blocks: int = 0, done_layers: int = 0):
        self.notes, self.n_layers, self.done, self.progress = notes, n_layers, done_layers, progress
        self.report: list[LayerReport] = []
        self.bar = tqdm(total=n_blocks, initial=done_blocks, desc="qkern", unit="block",
                        disable=not progress, file=sys.stderr)

    def __call__(self, name: str, err: float, seconds: float) -> None:
        self.done += 1
        self.report.append(LayerReport(name, err, seconds, self.notes.get(name, "")))
        if self.progress:
            self.bar.write(f"({self.done}/{self.n_layers}) {name}  err {err:.2e}  "
                           f"{seconds:.2f} s", file=sys.stderr)

    def block_done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def quantize_block_copy(quantizer: SequentialQuantizer, list_name: str, index: int, count: int,
                        blk: nn.Module, inputs: Sequence[Batch], cannot: dict[str, str],
                        log: Callable, advance: Callable = next_block_inputs):
    """The pipeline's step for one block: quantizes ``blk`` (block ``index`` of ``count``, a
    float copy the caller owns; its linears are replaced in place) on ``inputs`` (its
    calibration inputs; empty without data) and returns the next block's inputs,
    ``advance(block, inputs)``, computed on the quantized block (or, for methods calibrating
    on float activations, on the transformed float block before quantization); ``inputs``
    itself when it is empty. ``cannot``: :func:`preflight_block`'s answer. What
    :func:`quantize_sequential` and ``qkern.quantize_pretrained`` run for every block."""
    name = f"{list_name}.{index}"
    linearize_conv1d(blk)
    layers = {}
    for rel in block_linears(blk):
        mod = blk.get_submodule(rel)
        c = quantizer.layer_config(f"{name}.{rel}", mod)
        why = cannot.get(rel)
        if c is not None and c != quantizer.layer_config(f"{list_name}.0.{rel}", mod):
            # a per-layer override (mixed precision): block 0's probe does not apply
            why = quantizer.preflight(f"{name}.{rel}", mod, c)
        if c is not None and why is not None:
            quantizer.skipped[f"{name}.{rel}"] = why
        elif c is not None:
            layers[rel] = c
    groups = (sequential_groups(blk, inputs[0], list(layers)) if inputs
              else [[n] for n in layers])
    if not getattr(quantizer.config, "true_sequential", True):
        groups = [[n for g in groups for n in g]]
    ctx = BlockContext(name, index, count, blk, inputs, layers, groups, scale_pairs(blk),
                       quantizer.notes)
    for q in quantizer.chain():  # transforms first, then the layer method's own
        q.process_block(ctx)
    # the next block sees this block's float (transformed) outputs, or its quantized ones
    nxt = advance(blk, inputs) if inputs and quantizer.float_inputs() else None
    quantizer.quantize_block(ctx, log)
    if not inputs:
        return inputs
    return nxt if nxt is not None else advance(blk, inputs)


def quantize_sequential(model: nn.Module, quantizer: SequentialQuantizer,
                        calibration: Iterable | None, inplace: bool = False,
                        progress: bool | None = None, distributed: bool | None = None
                        ) -> nn.Module:
    """Runs ``quantizer`` block by block over ``model`` (see the module docstring); returns
    the quantized model (``model`` itself when ``inplace``). ``distributed``: data- and
    layer-parallel over the torch.distributed group (None: when one with several ranks is
    initialized; :mod:`~qkern.quantization.distributed`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_model(model)
    list_name, blocks = find_blocks(model)
    dp = resolve(distributed)
    _check_distributed(quantizer, dp)
    batches = None if calibration is None else shard(as_batches(calibration), dp)
    why = quantizer.needs_calibration()
    if why and batches is None:
        raise ValueError(f"{type(quantizer.config).__name__} needs calibration data (it {why})"
                         ": pass calibration=[token ids (1, L), ...]")
    target = model if inplace else _shared_copy(model, blocks)
    _, tblocks = find_blocks(target)
    if progress is None:
        progress = quantizer.progress if quantizer.progress is not None else sys.stderr.isatty()
    progress = progress and (dp is None or dp.rank == 0)
    cannot = preflight_block(quantizer, list_name, blocks[0])
    inputs = capture_first_block_inputs(target, tblocks[0], batches) if batches else []
    log = BlockLog(quantizer.notes, len(tblocks), sum(len(block_linears(b)) for b in tblocks),
                   progress)
    try:
        with data_parallel(dp):  # the statistics are all-reduced inside
            for i in range(len(tblocks)):
                blk = _block_copy(tblocks[i], quantizer)
                inputs = quantize_block_copy(quantizer, list_name, i, len(tblocks), blk,
                                             inputs, cannot, log)
                _unshare(blk, tblocks[i])
                tblocks[i] = blk
                log.block_done()
    finally:
        log.close()
    quantizer.report = log.report
    if quantizer.notes:
        warn_notes(quantizer.notes)
    return target


def check_weight_bits(cfg) -> None:
    """Validates the ``bits`` / ``group_size`` / ``sym`` fields every sequential config has
    (and ``then``, where a transform config has it: an LLM method config with the same
    bits / group_size / sym)."""
    n = type(cfg).__name__
    then = getattr(cfg, "then", None)
    if then is not None:
        if not isinstance(then, BaseConfig):
            fail(n, "then", "None or an LLM method config (RTNConfig, GPTQConfig, ...)", then)
        for f in ("bits", "group_size", "sym"):
            if getattr(then, f, None) != getattr(cfg, f):
                raise ValueError(f"{n}.then: {type(then).__name__}.{f}={getattr(then, f, None)!r}"
                                 f" differs from {n}.{f}={getattr(cfg, f)!r}; set them equal")
    check_int(n, "bits", cfg.bits, 2)
    if cfg.bits > 8:
        fail(n, "bits", "an int in 2..8", cfg.bits)
    check_group(n, "group_size", cfg.group_size)
    check_bool(n, "sym", cfg.sym)
