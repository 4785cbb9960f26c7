"""ZeroQuant (Yao et al. 2022): group-wise weight quantization (int8 or int4, round to
nearest) with token-wise dynamic int8 activations (one scale ``max|x_token| / 127`` per row of
each linear's input, at every call), and the optional layer-by-layer knowledge distillation
(LKD): each quantized block is trained to reproduce the float block's output on its
calibration inputs, ``min_W || B_q(X; Q(W)) - B(X; W) ||^2`` with straight-through fake
quantization of the weights (and of the activations, per token), a few steps of Adam, then
rounded. The block inputs X are the outputs of the already quantized blocks (the sequential
pipeline).

Kernels: int8 per output channel (``group_size=None``, symmetric) runs on the fused integer
W8A8 GEMM (``act="int8_dynamic"``, gemm_w8a8); group-wise weights run their float-activation
kernel (w4 / w23, or the "dequant" fallback for int8 groups) behind per-token int8
quantization of x (``act="int8_token"``)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.token_int8 import per_token_int8
from ...quantize import fake_quantize
from ..calibration import call_model
from ..constraints import (
    HardwareConstraints,
    check_dynamic_activations,
    constrained_fake_weight,
    symmetric_weights,
)
from ..distributed import all_reduce_sum, batch_count, local_batch, sum_batches
from ..layers import weight_module
from ..registry import (
    BaseConfig,
    check_bool,
    check_int,
    check_real,
    config_class,
    fail,
    register_quantizer,
    replace_module,
)
from ..sequential import BlockContext, SequentialQuantizer, check_weight_bits

__all__ = ["ZeroQuantConfig", "ZeroQuantQuantizer", "zeroquant_act", "zeroquant_weight"]


@config_class
@dataclass
class ZeroQuantConfig(BaseConfig):
    """``bits`` 8 or 4 (weights), ``group_size`` (None: one scale per output channel, the
    finest row partition of the paper's groups), ``sym``; activations: int8 per token.
    ``lkd``: layer-by-layer distillation of each block (``lkd_steps`` Adam steps at
    ``lkd_lr`` over the calibration batches; the paper trains ~400 steps at small learning
    rates on large models; the default suits small ones). A block whose distilled output error
    does not improve keeps its undistilled weights."""

    bits: int = 8
    group_size: int | None = None
    sym: bool = True
    lkd: bool = False
    lkd_steps: int = 50
    lkd_lr: float = 3e-5

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_weight_bits(self)
        if self.bits not in (4, 8):
            fail(n, "bits", "4 or 8", self.bits)
        check_bool(n, "lkd", self.lkd)
        check_int(n, "lkd_steps", self.lkd_steps, 1)
        check_real(n, "lkd_lr", self.lkd_lr, 1e-12, 1.0, "a learning rate in (0, 1]")
        super().__post_init__()


def zeroquant_act(cfg: ZeroQuantConfig, group_size: int | None) -> str:
    """The activation mode: the fused int8 GEMM for symmetric int8 weights per output
    channel, per-token int8 in front of the weight's kernel otherwise."""
    return ("int8_dynamic" if cfg.bits == 8 and group_size is None
            and symmetric_weights(cfg.constraints, f"int{cfg.bits}", cfg.sym)
            else "int8_token")


def _quant_kwargs(group_size: int | None, sym: bool) -> dict:
    if group_size is None:
        return {"granularity": "channel", "axis": 0, "symmetric": sym}
    return {"granularity": "group", "axis": 1, "group_size": group_size, "symmetric": sym}


def zeroquant_weight(w: torch.Tensor, bits: int, group_size: int | None, sym: bool,
                     constraints: HardwareConstraints | None = None) -> torch.Tensor:
    """The round-to-nearest weight (out, in) the quantized layer holds, differentiable with
    the straight-through estimator (``qkern.fake_quantize``). With ``constraints`` the
    forward value is the constrained layer's weight
    (``constraints.constrained_fake_weight``: the grid of ``grid_params``, the accumulator
    bound) and the gradient passes unchanged (straight through)."""
    if constraints is not None and constraints.touches_weights():
        target = constrained_fake_weight(w, f"int{bits}", constraints, sym, group_size,
                                         "zeroquant_weight")
        return w + (target.to(w.dtype) - w).detach()
    return fake_quantize(w, f"int{bits}", **_quant_kwargs(group_size, sym))


class _FakeQuantLinear(nn.Module):
    """LKD's training twin of a linear: per-token int8 x, fake-quantized weight (STE)."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int | None, sym: bool,
                 constraints: HardwareConstraints | None = None):
        super().__init__()
        self.linear, self.bits, self.group_size, self.sym = linear, bits, group_size, sym
        self.constraints = constraints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq = per_token_int8(x.reshape(-1, shape[-1]).float()).reshape(shape)
        w = zeroquant_weight(self.linear.weight, self.bits, self.group_size, self.sym,
                             self.constraints)
        return F.linear(xq, w, self.linear.bias)


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@register_quantizer(ZeroQuantConfig)
class ZeroQuantQuantizer(SequentialQuantizer):
    """``constraints``: the weights (and LKD's fake-quantized training weights) on the
    constrained grid (``symmetric``, ``accumulator_bits``); the activations are quantized per
    token at run time, so ``pow2_scales`` and ``per_tensor`` are refused (docs/hardware.md)."""

    GRAMS = False
    NEEDS_DATA = False
    APPLIES_CONSTRAINTS = True

    def __init__(self, config):
        super().__init__(config)
        #: {block name: (output MSE before LKD, after)} of the distilled blocks
        self.lkd_losses: dict[str, tuple[float, float]] = {}

    def needs_calibration(self) -> str | None:
        return "distills each block on calibration inputs (lkd=True)" if self.config.lkd \
            else None

    def layer_group(self, name: str, cfg, k: int) -> int | None:
        """The group size of layer ``name``; int4 per output channel is one group of K
        (qkern's int4 kernel stores groups along K)."""
        return self.group_for(name, cfg, k) if cfg.bits == 4 else (
            None if cfg.group_size is None or k % cfg.group_size else cfg.group_size)

    def check_constraints(self, cfg, name: str) -> None:
        """The base rules, and those of its per-token dynamic int8 activations."""
        super().check_constraints(cfg, name)
        check_dynamic_activations(cfg.constraints, True, f"ZeroQuantConfig (layer {name})",
                                  "ZeroQuant's activations are int8 per token (for power-of-two"
                                  " or per-tensor scales use SmoothQuantConfig(act="
                                  "'static_tensor') or RTNConfig / GPTQConfig)")

    def quantize_layer(self, name, linear, gram, cfg):
        g = self.layer_group(name, cfg, linear.in_features)
        if cfg.bits == 8 and cfg.group_size is not None and g is None:
            self.notes[name] = (f"group_size {cfg.group_size} does not divide its input size "
                                f"{linear.in_features}: quantized per output channel")
        return weight_module(linear, f"int{cfg.bits}", g, self.notes, name, symmetric=cfg.sym,
                             act=zeroquant_act(cfg, g), constraints=cfg.constraints)

    def preflight(self, name, linear, cfg) -> str | None:
        """None, or why the layer cannot be built (every weight runs: the int8_token path
        takes any format behind its own kernel or the "dequant" fallback)."""
        probe = nn.Linear(linear.in_features, linear.out_features, bias=False)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.quantize_layer(name, probe, None, cfg)
        except ValueError as e:
            return str(e)
        finally:
            self.notes.pop(name, None)
        return None

    def process_block(self, ctx: BlockContext) -> None:
        if not self.config.lkd or not ctx.inputs or not ctx.layers:
            return
        self.lkd_losses[ctx.name] = distill_block(self, ctx)


def _block_mse(ctx: BlockContext, target: list[torch.Tensor]) -> float:
    """The mean over all ranks' batches of the per-batch output MSE (added in the calibration
    list's order: one process's sum, bit for bit)."""
    with torch.no_grad():
        errs = [F.mse_loss(_hidden(call_model(ctx.block, b)).float(), t).item()
                for b, t in zip(ctx.inputs, target)]
    total = sum_batches(torch.tensor(errs, dtype=torch.float64))
    return float(total) / batch_count(len(errs))


def _lkd_step(ctx: BlockContext, target: list[torch.Tensor], params: list, i: int
              ) -> float | None:
    """Batch ``i`` (of the full calibration list) 's loss, and its gradient in ``params``'
    ``.grad``: computed by the rank holding the batch, summed with the others' zeros (exact),
    so every rank steps as one process would. None (no gradient) when the loss is not
    finite."""
    j = local_batch(i)
    loss = None
    if j is not None:
        loss = F.mse_loss(_hidden(call_model(ctx.block, ctx.inputs[j])).float(), target[j])
    value = float(all_reduce_sum(torch.tensor(0.0 if loss is None else loss.item(),
                                              dtype=torch.float64)))
    if not math.isfinite(value):
        return None
    for p in params:
        p.grad = None
    if loss is not None:
        loss.backward()
    # which parameters got a gradient (Adam skips the others), then the gradients themselves
    has = all_reduce_sum(torch.tensor([p.grad is not None for p in params], dtype=torch.int64))
    for p, h in zip(params, has.tolist()):
        if h:
            p.grad = all_reduce_sum(p.grad if p.grad is not None else torch.zeros_like(p))
    return value


def distill_block(q: ZeroQuantQuantizer, ctx: BlockContext) -> tuple[float, float]:
    """LKD on one block (in place): returns the block's output MSE to the float block with
    fake-quantized weights and activations before and after (the better weights are kept)."""
    target = [t.detach().float() for t in ctx.float_outputs]
    twins, originals = {}, {}
    for rel, cfg in ctx.layers.items():
        lin = ctx.block.get_submodule(rel)
        originals[rel] = lin.weight.detach().clone()
        g = q.layer_group(ctx.full_name(rel), cfg, lin.in_features)
        twins[rel] = _FakeQuantLinear(lin, cfg.bits, g, cfg.sym, cfg.constraints)
        replace_module(ctx.block, rel, twins[rel])
    grads = {p: p.requires_grad for p in ctx.block.parameters()}
    try:
        for p in ctx.block.parameters():
            p.requires_grad_(False)
        params = [t.linear.weight for t in twins.values()]
        for p in params:
            p.requires_grad_(True)
        before = _block_mse(ctx, target)
        opt = torch.optim.Adam(params, lr=q.config.lkd_lr)
        n = batch_count(len(ctx.inputs))
        for step in range(q.config.lkd_steps):
            if _lkd_step(ctx, target, params, step % n) is None:
                break
            opt.step()
        after = _block_mse(ctx, target)
        if not after < before:  # not better: keep the round-to-nearest start
            with torch.no_grad():
                for rel, w in originals.items():
                    twins[rel].linear.weight.copy_(w)
            after = before
    finally:
        for p, r in grads.items():
            p.requires_grad_(r)
        for rel, t in twins.items():
            replace_module(ctx.block, rel, t.linear)
    return before, after
