"""OmniQuant (Shao et al., ICLR 2024): learnable weight clipping (LWC) and learnable
equivalent transformation (LET), trained block by block on the MSE between the quantized
block's output and the float model's block output, AdamW, straight-through rounding.

LWC (paper eq. 2): per group, ``h = sigmoid(gamma) max(W)``, ``l = sigmoid(beta) min(W)``,
``scale = (h - l) / (2^N - 1)``, ``zp = -round(l / scale)``; gamma and beta start at 4
(the authors' ``init_value``, sigmoid(4) = 0.982) and train at lr 1e-2. Here the range also
holds zero and the grid is qkern's ``int{bits}`` one (docs/numerics.md: ``t = w * (1/scale)``,
``q = clamp(rne(t) + zp, qmin, qmax)``, ``w_q = (q - zp) scale``), so the trained fake
quantization is, bit for bit, the weight the final :class:`~qkern.nn.QuantLinear` holds.

LET (paper eq. 3-5), scales only: a per-channel scale ``s`` between each norm / linear and
the linears it feeds (``X W = (X / s)(s W)``, the pairs of
:func:`~qkern.quantization.blocks.scale_pairs`), started at SmoothQuant's
``max|X|^0.5 / max|W|^0.5`` and trained at lr 5e-3, folded into the weights at the end
(:func:`~qkern.quantization.blocks.fold_scales`). No shift: the authors use one only for
weight-activation quantization of models with norm biases (OPT), off for Llama and for
weight-only quantization; no q/k scale (it does not commute with RoPE).

Weight-activation (``act_bits=8``, the paper's W8A8): each quantized linear's input is
fake-quantized per token (symmetric int8, as qkern's w8a8 kernel) while training, and the
layers run on that kernel.

Training target (the authors' ``fp_inps``): the float model's block output on the float
model's block input, carried from block to block beside the quantized path
(``target="float"``); ``target="block"`` uses the float block on the quantized inputs
(``ctx.float_outputs``). ``aug_loss=True`` (the authors' ``--aug_loss``, on in their W2A16
scripts) adds the MSE to the float block's output on the quantized inputs (their
``fp_inps_2``) to the loss.

``then=GPTQConfig(...)`` (same bits / group_size / sym; not in the paper): after training,
each group's weights are clamped to the learned range ``[lo, hi]`` and the layers are handed
to that method (true-sequential, as AWQ's ``then``), so GPTQ rounds inside OmniQuant's clip.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ...nn import QuantLinear
from ..blocks import fold_scales
from ..constraints import (
    check_dynamic_activations,
    constrained_fake_weight,
    symmetric_weights,
)
from ..layers import weight_module
from ..registry import (
    BaseConfig,
    Batch,
    check_bool,
    check_choice,
    check_int,
    check_real,
    config_class,
    fail,
    register_quantizer,
    replace_module,
)
from ..sequential import (
    BlockContext,
    SequentialQuantizer,
    block_outputs,
    check_weight_bits,
    relative_output_error,
)
from .omniquant_math import (
    act_fake_quant,
    clip_weight,
    fake_quant_inputs,
    lwc_fake_quant,
    lwc_qparams,
    lwc_range,
    round_ste,
)

__all__ = ["OmniQuantConfig", "OmniQuantQuantizer", "act_fake_quant", "fake_quant_inputs",
           "lwc_fake_quant", "lwc_qparams", "lwc_range", "round_ste"]

log = logging.getLogger("qkern.omniquant")

#: the targets of the block loss
TARGETS = ("float", "block")


@config_class
@dataclass
class OmniQuantConfig(BaseConfig):
    """OmniQuant weight-only quantization: ``bits`` 2..8, ``group_size`` (None: per output
    channel), ``sym`` (False: asymmetric with a zero point, as the paper); ``lwc`` / ``let``
    switch the two learnable parts; ``epochs`` over the calibration set (paper: 20, 40 at
    W2A16), AdamW at ``lr_lwc`` (1e-2) and ``lr_let`` (5e-3) with weight decay ``wd`` (0);
    ``batch_size`` calibration batches per step (1); ``lwc_init`` the clip logits' start (4);
    ``let_alpha`` SmoothQuant's migration strength for LET's start (0.5); ``target`` the
    block loss's target ("float": the float model's output, as the authors; "block": the
    float block on the quantized inputs); ``aug_loss`` adds the MSE to the float block on the
    quantized inputs (the authors' ``--aug_loss``, used in their W2A16 scripts with 40
    epochs); ``then`` an LLM method config (e.g. GPTQConfig, same bits / group_size / sym)
    that quantizes the layers inside the learned clip. ``act_bits=8``: the paper's W8A8,
    linear inputs fake-quantized per token (symmetric int8, ``amax / 127``) while training,
    layers on qkern's w8a8 kernel; needs ``bits=8, group_size=None, sym=True``."""

    bits: int = 4
    group_size: int | None = 128
    sym: bool = False
    lwc: bool = True
    let: bool = False
    epochs: int = 20
    lr_lwc: float = 1e-2
    lr_let: float = 5e-3
    wd: float = 0.0
    batch_size: int = 1
    lwc_init: float = 4.0
    let_alpha: float = 0.5
    target: str = "float"
    act_bits: int | None = None
    aug_loss: bool = False
    then: BaseConfig | None = None

    def __post_init__(self) -> None:
        check_weight_bits(self)
        n = type(self).__name__
        check_bool(n, "lwc", self.lwc)
        check_bool(n, "let", self.let)
        check_bool(n, "aug_loss", self.aug_loss)
        check_int(n, "epochs", self.epochs, 0)
        check_int(n, "batch_size", self.batch_size, 1)
        for f in ("lr_lwc", "lr_let"):
            check_real(n, f, getattr(self, f), 0.0, 10.0, "a learning rate in [0, 10]")
        check_real(n, "wd", self.wd, 0.0, 10.0, "a weight decay in [0, 10]")
        check_real(n, "lwc_init", self.lwc_init, -30.0, 30.0, "a float in [-30, 30]")
        check_real(n, "let_alpha", self.let_alpha, 0.0, 1.0, "a float in [0, 1]")
        check_choice(n, "target", self.target, TARGETS)
        if self.act_bits is not None:
            check_choice(n, "act_bits", self.act_bits, (None, 8))
            if (self.bits, self.group_size, self.sym) != (8, None, True):
                raise ValueError(f"{n}.act_bits=8 runs on qkern's w8a8 kernel (per-channel "
                                 "symmetric int8 weights): set bits=8, group_size=None, "
                                 "sym=True")
        if self.then is not None and self.act_bits is not None:
            raise ValueError(f"{n}.then is for weight-only quantization: act_bits must be None")
        if self.epochs > 0 and not (self.lwc or self.let):
            fail(n, "lwc", "True when let is False and epochs > 0 (nothing to train)", self.lwc)
        super().__post_init__()


def _hidden(batch: Batch) -> torch.Tensor:
    return batch.args[0] if batch.args else batch.kwargs["hidden_states"]


def _with_hidden(batch: Batch, h: torch.Tensor) -> Batch:
    if batch.args:
        return Batch((h, *batch.args[1:]), batch.kwargs)
    return Batch((), {**batch.kwargs, "hidden_states": h})


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def _act_absmax(block: nn.Module, names: list[str], inputs: list[Batch]) -> dict:
    """max |x| per input channel of each named linear over the calibration inputs."""
    got: dict[str, torch.Tensor] = {}
    hooks = []
    for n in names:
        def pre(mod, args, n=n):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            got[n] = a if n not in got else torch.maximum(got[n], a)
        hooks.append(block.get_submodule(n).register_forward_pre_hook(pre))
    try:
        block_outputs(block, inputs)
    finally:
        for h in hooks:
            h.remove()
    return got


@register_quantizer(OmniQuantConfig)
class OmniQuantQuantizer(SequentialQuantizer):
    """Trains LWC (and LET) per block, then stores each linear on qkern's int kernels with the
    learned clip. ``history[block name]``: the mean block loss before training and after each
    epoch; ``clips[layer name]``: the learned ``(sigmoid(gamma), sigmoid(beta))`` (N, groups)."""

    GRAMS = True
    DISTRIBUTED = False
    NOT_DISTRIBUTED = ("its LWC / LET training sums gradients over mini-batches of several "
                       "calibration batches: split over ranks, the sums take another order "
                       "and Adam's epochs carry the difference on; docs/distributed.md")
    NEEDS_DATA = True
    APPLIES_CONSTRAINTS = True

    def check_constraints(self, cfg, name: str) -> None:
        """The base rules, and with ``act_bits=8`` those of per-token dynamic activations."""
        super().check_constraints(cfg, name)
        if cfg.act_bits == 8:
            check_dynamic_activations(cfg.constraints, True,
                                      f"OmniQuantConfig(act_bits=8) (layer {name})",
                                      "use act_bits=None (weight-only)")

    def __init__(self, config):
        super().__init__(config)
        #: {layer (block-relative): its hardware constraints} of the block being trained
        self._cons: dict = {}
        self.history: dict[str, list[float]] = {}
        self.clips: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fp: list[torch.Tensor] | None = None

    # ---- the learnable parameters --------------------------------------------------------

    def _lwc_params(self, ctx: BlockContext) -> dict[str, tuple]:
        """{rel: (group, bits, sym, up, low)} for each layer to quantize."""
        c = self.config
        out = {}
        for rel, cfg in ctx.layers.items():
            w = ctx.block.get_submodule(rel).weight
            n, k = w.shape
            g = self.group_for(ctx.full_name(rel), cfg, k) or k
            up = low = None
            if c.lwc:
                up = nn.Parameter(torch.full((n, k // g), float(c.lwc_init)))
                low = nn.Parameter(torch.full((n, k // g), float(c.lwc_init)))
            sym = symmetric_weights(cfg.constraints, f"int{cfg.bits}", cfg.sym)
            out[rel] = (g, cfg.bits, sym, up, low)
        return out

    def _let_params(self, ctx: BlockContext) -> list[tuple[str, list[str], nn.Parameter]]:
        """(prev, nexts, s) for each foldable pair whose linears are all quantized; ``s``
        starts at SmoothQuant's ``max|X|^alpha / max|W|^(1 - alpha)``."""
        if not self.config.let or not ctx.inputs:
            return []
        pairs = [(p, ns) for p, ns in ctx.pairs if all(n in ctx.layers for n in ns)]
        acts = _act_absmax(ctx.block, [ns[0] for _, ns in pairs], ctx.inputs)
        a = self.config.let_alpha
        out = []
        for p, ns in pairs:
            wmax = torch.stack([ctx.block.get_submodule(n).weight.detach().abs().amax(0)
                                for n in ns]).amax(0)
            s = (acts[ns[0]].clamp_min(1e-5).pow(a) / wmax.clamp_min(1e-5).pow(1 - a))
            out.append((p, list(ns), nn.Parameter(s.clamp_min(1e-5).float())))
        return out

    @staticmethod
    def _let_weights(block: nn.Module, let: list) -> dict[str, torch.Tensor]:
        """The block's tensors after the equivalent transformations (differentiable in s)."""
        eff: dict[str, torch.Tensor] = {}

        def get(name):
            return eff[name] if name in eff else block.get_submodule(name.rsplit(".", 1)[0]) \
                .get_parameter(name.rsplit(".", 1)[1])

        for prev, nexts, s in let:
            s = s.clamp_min(1e-2)  # the authors truncate |s| at 1e-2
            pm = block.get_submodule(prev)
            eff[f"{prev}.weight"] = get(f"{prev}.weight") / (s if pm.weight.dim() == 1
                                                            else s.reshape(-1, 1))
            if getattr(pm, "bias", None) is not None:
                eff[f"{prev}.bias"] = get(f"{prev}.bias") / s
            for n in nexts:
                eff[f"{n}.weight"] = get(f"{n}.weight") * s.reshape(1, -1)
        return eff

    def _fake_weights(self, block: nn.Module, lwc: dict, let: list) -> dict[str, torch.Tensor]:
        eff = self._let_weights(block, let)
        for rel, (g, bits, sym, up, low) in lwc.items():
            key = f"{rel}.weight"
            w = eff.get(key, block.get_submodule(rel).weight)
            fq = lwc_fake_quant(w, g, bits, sym, up, low)[0]
            c = self._cons.get(rel)
            if c is not None and c.touches_weights():
                # forward: the constrained layer of the clipped weight (what is deployed);
                # gradient: the unconstrained LWC's (straight through the constraints)
                with torch.no_grad():
                    target = constrained_fake_weight(clip_weight(w, g, sym, up, low),
                                                     f"int{bits}", c, sym, g, rel)
                fq = fq + (target.to(fq.dtype) - fq).detach()
            eff[key] = fq
        return eff

    # ---- training ------------------------------------------------------------------------

    def cross_block_state(self) -> bool:
        return self.config.target != "block"  # the float model's outputs, block to block

    def _targets(self, ctx: BlockContext) -> list[torch.Tensor]:
        if self.config.target == "block":
            return ctx.float_outputs
        if ctx.index == 0 or self._fp is None or len(self._fp) != len(ctx.inputs):
            self._fp = [_hidden(b) for b in ctx.inputs]
        fp_in = [_with_hidden(b, h) for b, h in zip(ctx.inputs, self._fp)]
        self._fp = block_outputs(ctx.block, fp_in)
        if ctx.index == ctx.count - 1:
            out, self._fp = self._fp, None
            return out
        return self._fp

    @staticmethod
    def _loss(o: torch.Tensor, j: int, targets: list, aug: list | None) -> torch.Tensor:
        """MSE to ``targets[j]`` (plus the MSE to ``aug[j]``: the authors' aug_loss)."""
        loss = torch.nn.functional.mse_loss(o, targets[j])
        if aug is not None:
            loss = loss + torch.nn.functional.mse_loss(o, aug[j])
        return loss

    def block_loss(self, ctx: BlockContext, lwc: dict, let: list,
                   targets: list[torch.Tensor], aug: list | None = None) -> float:
        """Mean loss (MSE to ``targets``, plus to ``aug`` when given) of the fake-quantized
        block over the calibration inputs."""
        with torch.no_grad(), self._acts(ctx):
            eff = self._fake_weights(ctx.block, lwc, let)
            tot = 0.0
            for j, b in enumerate(ctx.inputs):
                o = _out(functional_call(ctx.block, eff, b.args, b.kwargs, strict=False))
                tot += float(self._loss(o, j, targets, aug))
        return tot / max(len(targets), 1)

    def _acts(self, ctx: BlockContext):
        if self.config.act_bits is None:
            return contextlib.nullcontext()
        return fake_quant_inputs(ctx.block, list(ctx.layers))

    def _train(self, ctx: BlockContext, lwc: dict, let: list, targets: list,
               aug: list | None = None) -> list[float]:
        c = self.config
        hist = [self.block_loss(ctx, lwc, let, targets, aug)]
        groups = []
        if let:
            groups.append({"params": [s for *_, s in let], "lr": c.lr_let})
        lw = [p for *_, up, low in lwc.values() for p in (up, low) if p is not None]
        if lw:
            groups.append({"params": lw, "lr": c.lr_lwc})
        if not groups or c.epochs == 0:
            return hist
        opt = torch.optim.AdamW(groups, weight_decay=c.wd)
        n = len(ctx.inputs)
        show = bool(self.progress)
        for ep in range(c.epochs):
            t0, tot = time.perf_counter(), 0.0
            for i in range(0, n, c.batch_size):
                opt.zero_grad(set_to_none=True)
                eff = self._fake_weights(ctx.block, lwc, let)
                loss = 0.0
                chunk = range(i, min(i + c.batch_size, n))
                with self._acts(ctx):
                    for j in chunk:
                        b = ctx.inputs[j]
                        o = _out(functional_call(ctx.block, eff, b.args, b.kwargs,
                                                 strict=False))
                        loss = loss + self._loss(o, j, targets, aug) / len(chunk)
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(chunk)
            hist.append(tot / n)
            msg = (f"{ctx.name} epoch {ep + 1}/{c.epochs}  loss {hist[-1]:.3e}  "
                   f"{time.perf_counter() - t0:.2f} s")
            log.info(msg)
            if show:
                print(msg, file=sys.stderr, flush=True)
        hist[-1] = self.block_loss(ctx, lwc, let, targets, aug)  # after the last step
        return hist

    # ---- the block -----------------------------------------------------------------------

    def quantize_layer(self, name: str, linear: nn.Linear, gram, cfg) -> nn.Module:
        """With ``then``: that method's layer (weights already clamped to the learned clip).
        Otherwise not used: OmniQuant trains whole blocks (:meth:`quantize_block`), so it
        cannot be handed single layers as another config's ``then``."""
        if self.inner is not None:
            return super().quantize_layer(name, linear, gram, cfg)
        raise ValueError(f"{name}: OmniQuantConfig trains whole blocks and cannot be another "
                         "config's then=; use it as the outer config")

    def quantize_block(self, ctx: BlockContext, log) -> None:
        """Trains the block's clip logits (and LET scales), folds the scales, then stores each
        linear on qkern's grid with the learned clip (one log line per layer)."""
        t0 = time.perf_counter()
        floats = ctx.inputs and (ctx.layers or self.config.target == "float")
        targets = self._targets(ctx) if floats else []  # also carries the float path along
        if not ctx.layers:
            return
        for p in ctx.block.parameters():
            p.requires_grad_(False)
        self._cons = {rel: cfg.constraints for rel, cfg in ctx.layers.items()}
        lwc = self._lwc_params(ctx)
        let = self._let_params(ctx)
        if ctx.inputs:
            # the authors' fp_inps_2: the float block on the quantized inputs
            aug = ctx.float_outputs if self.config.aug_loss else None
            with torch.enable_grad():  # also when quantize_model runs under no_grad
                self.history[ctx.name] = self._train(ctx, lwc, let, targets, aug)
        with torch.no_grad():
            for prev, nexts, s in let:
                fold_scales(ctx.block, prev, nexts, s.detach().clamp_min(1e-2))
        for rel, (g, _, sym, up, low) in lwc.items():
            if up is not None:
                self.clips[ctx.full_name(rel)] = (torch.sigmoid(up.detach()),
                                                  torch.sigmoid(low.detach()))
        if self.inner is not None:
            self._clamp_to_clip(ctx, lwc)
            return super().quantize_block(ctx, log)
        names = list(ctx.layers)
        grams = ctx.grams(names) if ctx.inputs else {}
        share = (time.perf_counter() - t0) / len(names)
        act = "none" if self.config.act_bits is None else "int8_dynamic"
        for rel in names:
            t1 = time.perf_counter()
            lin = ctx.block.get_submodule(rel)
            w = lin.weight.detach().float().clone()
            cfg = ctx.layers[rel]
            if cfg.constraints is not None and cfg.constraints.touches_weights():
                # the constrained grid (grid_params / the l1 budget) of the clipped weight
                g, _, sym, up, low = lwc[rel]
                with torch.no_grad():
                    lin.weight.copy_(clip_weight(w, g, sym, up, low).to(lin.weight.dtype))
                new = weight_module(lin, f"int{cfg.bits}", self.group_for(
                    ctx.full_name(rel), cfg, lin.in_features), self.notes, ctx.full_name(rel),
                    symmetric=cfg.sym, constraints=cfg.constraints, act=act)
            else:
                new = self.build_layer(lin, *lwc[rel], act=act)
            replace_module(ctx.block, rel, new)
            err = relative_output_error(w, new.dequantize_weight(), grams.get(rel))
            log(ctx.full_name(rel), err, share + time.perf_counter() - t1)

    @staticmethod
    def _clamp_to_clip(ctx: BlockContext, lwc: dict) -> None:
        """Clamps each weight group to its learned ``[lo, hi]`` (sym: ``+-max(hi, -lo)``)."""
        with torch.no_grad():
            for rel, (g, _, sym, up, low) in lwc.items():
                w = ctx.block.get_submodule(rel).weight
                w.copy_(clip_weight(w, g, sym, up, low).to(w.dtype))

    @staticmethod
    def build_layer(lin: nn.Linear, group: int, bits: int, sym: bool,
                    up: torch.Tensor | None, low: torch.Tensor | None,
                    act: str = "none") -> QuantLinear:
        """The QuantLinear holding ``lin``'s weight quantized with the learned clip: its
        dequantized weight equals :func:`lwc_fake_quant`'s."""
        with torch.no_grad():
            w = lin.weight.detach().float()
            scale, zp = lwc_qparams(w, group, bits, sym, up, low)
        kw = {"scale": scale}
        if zp is not None:
            kw["zero_point"] = zp.to(torch.int32)
        gs = group
        if group == w.shape[1] and bits > 4:  # int8: per output channel
            gs = None
            kw = {k: v.reshape(-1) for k, v in kw.items()}
        return QuantLinear.from_float(lin, f"int{bits}", group_size=gs, symmetric=sym, act=act,
                                      **kw)
