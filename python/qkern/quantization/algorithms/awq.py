"""AWQ: activation-aware weight quantization (Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration"; reference code mit-han-lab/llm-awq).

Per block, for each foldable pair (preceding op -> linears: norm -> q/k/v, v -> o,
norm -> gate/up, up -> down; :func:`~qkern.quantization.blocks.scale_pairs`):

1. ``s_x`` = mean |x| per input channel of the linears' input (the calibration tokens);
2. for ``alpha`` in ``0, 1/n, ..., (n-1)/n`` (``n_grid=20``): ``s = s_x^alpha`` clamped to
   >= 1e-4 and normalised by ``sqrt(max(s) min(s))`` (paper eq. 5; with ``duo_scaling``,
   AutoAWQ's ``s_x^alpha / s_w^(1-alpha)``); the linears take ``Q(W diag(s)) diag(s)^-1``
   (round to nearest on qkern's ``int{bits}`` grid, the grid the final layer uses) and the
   mean squared error of the output of the module the pair feeds is scored
   (``objective="module"``, as llm-awq: the attention module for q/k/v, the MLP for gate/up,
   the linear itself after a linear predecessor; ``"block"``: the whole block's output);
3. the best ``s`` is folded into the preceding op (:func:`~qkern.quantization.blocks.
   fold_scales`: the float block computes the same function).

Then (``clip=True``) the clip search of llm-awq's auto_clip: per output row and group, the
max-value shrink ``1 - i / clip_grid`` (``i < max_shrink * clip_grid``: 1.0 ... 0.55) minimising
the group's output error ``E[(x_g . (w_g - Q(clamp(w_g))))^2]`` over all calibration tokens;
q/k (and fused qkv) layers are skipped, as llm-awq does. The weights are clamped to the chosen
range and the layers are quantized by the default round to nearest (or handed to ``then``,
e.g. ``AWQConfig(then=GPTQConfig(...))``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...quantize import fake_quantize
from ..blocks import fold_scales
from ..calibration import call_model
from ..constraints import HardwareConstraints, constrained_weight, grid_params
from ..registry import (
    BaseConfig,
    Batch,
    check_bool,
    check_choice,
    check_int,
    check_real,
    config_class,
    register_quantizer,
)
from ..sequential import BlockContext, SequentialQuantizer, check_weight_bits

__all__ = ["AWQ_OBJECTIVES", "CLIP_SKIP", "AWQConfig", "AWQQuantizer", "awq_scales",
           "clip_grams", "clip_quantize", "clip_ratios", "clip_search", "inspect_target",
           "pseudo_quantize"]

#: what the scale search scores: the output of the module the pair feeds, or of the block
AWQ_OBJECTIVES = ("module", "block")
#: layers the clip search skips (llm-awq: "due to qk bmm, it is hard to clip precisely";
#: fused qkv layers as llm-awq's Wqkv)
CLIP_SKIP = ("q_proj", "k_proj", "query", "key", "c_attn", "Wqkv", "qkv_proj",
             "query_key_value")
_NONE = HardwareConstraints()
#: elements per chunk of batched candidate weights (bounds the search's extra memory)
_CHUNK = 1 << 24


@config_class
@dataclass
class AWQConfig(BaseConfig):
    """AWQ weights: ``bits`` 2..8, ``group_size`` (None: per output channel), ``sym``
    (False: zero points, as llm-awq); ``n_grid`` alphas scored per pair (paper: 20),
    ``clip`` (the max-value shrink search, ``clip_grid`` / ``max_shrink`` as llm-awq's 20 /
    0.5; ``clip_tokens``: the clip error on every ``T // clip_tokens``-th of the T calibration
    tokens, as llm-awq's n_sample_token=512; None: all), ``duo_scaling`` (AutoAWQ's
    ``s_x^a / s_w^(1-a)``; llm-awq: off), ``objective``
    ("module" as llm-awq, or "block"), ``inputs`` ("float": each block searched on the
    float model's activations with the earlier blocks scaled but not quantized, as llm-awq;
    "quantized": on the quantized prefix's, the pipeline's default for GPTQ), ``then``: the
    LLM method that quantizes the scaled layers (None: round to nearest)."""

    bits: int = 4
    group_size: int | None = 128
    sym: bool = False
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int | None = 512
    duo_scaling: bool = False
    objective: str = "module"
    inputs: str = "float"
    then: BaseConfig | None = None

    def __post_init__(self) -> None:
        check_weight_bits(self)
        n = type(self).__name__
        check_int(n, "n_grid", self.n_grid, 1)
        check_bool(n, "clip", self.clip)
        check_int(n, "clip_grid", self.clip_grid, 1)
        check_real(n, "max_shrink", self.max_shrink, 0.0, 0.95, "a real in [0, 0.95]")
        if self.clip_tokens is not None:
            check_int(n, "clip_tokens", self.clip_tokens, 1)
        check_bool(n, "duo_scaling", self.duo_scaling)
        check_choice(n, "objective", self.objective, AWQ_OBJECTIVES)
        check_choice(n, "inputs", self.inputs, ("float", "quantized"))
        super().__post_init__()


# ---- the math, on tensors -------------------------------------------------------------------


def pseudo_quantize(w: torch.Tensor, bits: int, group_size: int | None, sym: bool,
                    c: HardwareConstraints | None = None) -> torch.Tensor:
    """Round to nearest of ``w`` (rows, K) on qkern's ``int{bits}`` grid, dequantized: per
    row (``group_size`` None) or in groups along K, as ``QuantLinear.from_float`` does; under
    hardware constraints ``c`` on the grid the final layer gets (``constraints.grid_params``,
    or ``constrained_weight`` with per_tensor / accumulator_bits)."""
    fmt = f"int{bits}"
    if c is not None and c.touches_weights():
        if c.per_tensor or c.accumulator_bits is not None:
            return constrained_weight(w.float(), fmt, c)[0]
        s, z = grid_params(w, fmt, c, sym, group_size)
        gran = {"granularity": "channel", "axis": 0} if group_size is None else {
            "granularity": "group", "axis": 1, "group_size": group_size}
        return fake_quantize(w, fmt, scale=s, zero_point=z, symmetric=z is None, **gran)
    if group_size is None:
        return fake_quantize(w, fmt, granularity="channel", axis=0, symmetric=sym)
    return fake_quantize(w, fmt, granularity="group", axis=1, group_size=group_size,
                         symmetric=sym)


def clip_quantize(w: torch.Tensor, bits: int, group_size: int | None, sym: bool,
                  c: HardwareConstraints | None = None) -> torch.Tensor:
    """The clip search's round to nearest: qkern's grid (scale ``(hi - lo) / (2^bits - 1)``
    in float32 over the range widened to hold 0, zero point ``qmin - round(lo / scale)``) with
    the codes ``round(w / scale)`` by division, as the paper's ``round(w / delta)`` and
    llm-awq's pseudo_quantize_tensor. The kernel multiplies by ``1 / scale`` (as torch);
    the two differ only on exact half-step ties, and a group clamped on both sides to
    ``[-r m, r m]`` puts every clamped value on one (``lo / scale = -(2^bits - 1) / 2``):
    the kernel then rounds both ends inward, llm-awq the low end outward. ``sym``: the
    kernel's grid (no such tie); so is a grid under hardware constraints ``c``."""
    if sym or (c is not None and c.touches_weights()):
        return pseudo_quantize(w, bits, group_size, sym, c)
    w = w.float()
    n, k = w.shape
    g = k if group_size is None else group_size
    wg = w.reshape(n, k // g, g)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    lo = wg.amin(-1, keepdim=True).clamp_max(0.0)
    hi = wg.amax(-1, keepdim=True).clamp_min(0.0)
    sc = (hi - lo) / float(qmax - qmin)
    sc = torch.where(sc > 0, sc.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(sc))
    z = (qmin - torch.round(lo / sc)).clamp(qmin, qmax)
    q = torch.minimum(torch.maximum(torch.round(wg / sc), qmin - z), qmax - z)
    return (q * sc).reshape(n, k)


def awq_scales(x_mean: torch.Tensor, alphas: torch.Tensor,
               w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """(A, K) float64 scales, one row per alpha: ``s = x_mean^alpha`` (or
    ``x_mean^alpha / (w_mean^(1-alpha) + 1e-4)``), clamped to >= 1e-4, divided by
    ``sqrt(max(s) min(s))``."""
    x = x_mean.double().reshape(1, -1)
    a = alphas.double().reshape(-1, 1)
    s = x.pow(a)
    if w_mean is not None:
        s = s / (w_mean.double().reshape(1, -1).pow(1 - a) + 1e-4)
    s = s.clamp_min(1e-4)
    return s / (s.amax(1, keepdim=True) * s.amin(1, keepdim=True)).sqrt()


def weight_mean(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """AutoAWQ's ``s_w``: mean over rows of ``|w| / max|w|`` of its group (duo scaling)."""
    w = torch.cat([t.detach().double() for t in weights])
    g = w.shape[1] if group_size is None else group_size
    wg = w.abs().reshape(-1, g)
    return (wg / (wg.amax(1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)


def clip_ratios(clip_grid: int = 20, max_shrink: float = 0.5) -> list[float]:
    """llm-awq's shrink grid: ``1 - i / clip_grid`` for ``i < max_shrink * clip_grid``."""
    return [1 - i / clip_grid for i in range(max(1, int(max_shrink * clip_grid)))]


def clip_search(w: torch.Tensor, gram_blocks: torch.Tensor, bits: int,
                group_size: int | None, sym: bool, ratios: list[float],
                c: HardwareConstraints | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """llm-awq's auto_clip on one layer: ``w`` (N, K); ``gram_blocks`` (G, g, g) the
    diagonal blocks ``E[x_g x_g^T]`` of the input second moment (one per group of ``g``
    columns; G = 1, g = K per channel). For each row and group, the ratio ``r`` minimising
    ``d H_g d^T`` with ``d = w_g - Q(clamp(w_g, -r m, r m))``, ``m = max|w_g|`` (the first
    one on ties; ``Q``: :func:`clip_quantize`). Returns (max values r m (N, G), ratios (N, G))."""
    w = w.detach().float()
    n, k = w.shape
    gs = k if group_size is None else group_size
    ng = k // gs
    h = gram_blocks.double()
    r = torch.tensor(ratios, dtype=torch.float32)
    wg = w.reshape(n, ng, gs)
    m = wg.abs().amax(-1)  # (N, G)
    pick = torch.empty(n, ng, dtype=torch.long)
    rows = max(1, _CHUNK // (len(ratios) * k))
    for i in range(0, n, rows):
        wc = wg[i:i + rows]
        mv = (r.reshape(-1, 1, 1) * m[i:i + rows]).unsqueeze(-1)  # (R, n, G, 1)
        cand = torch.minimum(torch.maximum(wc.unsqueeze(0), -mv), mv)
        q = clip_quantize(cand.reshape(-1, k), bits, group_size, sym, c)
        d = (wc.unsqueeze(0) - q.reshape(cand.shape)).double()  # (R, n, G, g)
        dg = d.permute(2, 0, 1, 3).reshape(ng, -1, gs)  # (G, R n, g)
        err = ((dg @ h) * dg).sum(-1).reshape(ng, len(ratios), -1)  # (G, R, n)
        pick[i:i + rows] = err.argmin(1).T
    chosen = r[pick]
    return chosen * m, chosen


def inspect_target(block: nn.Module, prev: str, nexts: list[str], objective: str) -> str:
    """The module whose output the scale search scores ("" = the block): llm-awq's
    module2inspect — the linear itself after a linear predecessor (v -> o, up -> down), else
    the linears' parent module (self_attn, mlp), or the linear when it sits directly in the
    block (OPT's fc1)."""
    if objective == "block":
        return ""
    if type(block.get_submodule(prev)) is nn.Linear and len(nexts) == 1:
        return nexts[0]
    parents = {n.rpartition(".")[0] for n in nexts}
    parent = parents.pop() if len(parents) == 1 else ""
    if not parent and len(nexts) == 1:
        return nexts[0]
    return parent


# ---- capture and scoring on a block ---------------------------------------------------------


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1])


def _capture(block: nn.Module, inputs: list[Batch], target: str, first: str, gram: bool):
    """Runs ``block`` on ``inputs`` once: the inputs of module ``target`` (one Batch each;
    ``inputs`` for the block), sum |x| and the token count of linear ``first``'s input (and
    ``X^T X`` when ``gram``)."""
    got: list[Batch] = []
    st: dict = {"abs": None, "n": 0, "xx": None}

    def lin_hook(mod, args):
        x = _rows(args[0]).float()
        a = x.abs().sum(0, dtype=torch.float64)
        st["abs"] = a if st["abs"] is None else st["abs"] + a
        st["n"] += x.shape[0]
        if gram:
            xx = (x.T @ x).double()
            st["xx"] = xx if st["xx"] is None else st["xx"] + xx

    def mod_hook(mod, args, kwargs):
        got.append(Batch(tuple(args), dict(kwargs)))

    handles = [block.get_submodule(first).register_forward_pre_hook(lin_hook)]
    if target and not gram:
        handles.append(block.get_submodule(target).register_forward_pre_hook(
            mod_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for b in inputs:
                call_model(block, b)
    finally:
        for h in handles:
            h.remove()
    if st["n"] == 0:
        raise ValueError(f"{first}: the layer did not run on the calibration data")
    recorded = got if target else list(inputs)
    xx = None if st["xx"] is None else st["xx"] / st["n"]
    return recorded, st["abs"] / st["n"], xx


def _scaled_candidates(w: torch.Tensor, scales: torch.Tensor, bits: int, group: int | None,
                       sym: bool, c: HardwareConstraints | None = None) -> torch.Tensor:
    """(A, N, K) float32 ``Q(W diag(s)) / s`` for each row ``s`` of ``scales`` (A, K);
    per-tensor constraints quantize each candidate on its own."""
    ws = (w.double().unsqueeze(0) * scales.unsqueeze(1)).float()
    if c is not None and c.per_tensor:
        q = torch.stack([pseudo_quantize(x, bits, group, sym, c) for x in ws])
    else:
        q = pseudo_quantize(ws.reshape(-1, w.shape[1]), bits, group, sym, c).reshape(ws.shape)
    return (q.double() / scales.unsqueeze(1)).float()


@register_quantizer(AWQConfig)
class AWQQuantizer(SequentialQuantizer):
    """AWQ (see the module docstring). After a run, ``alphas`` {block.prev: alpha chosen},
    ``losses`` {block.prev: [loss per alpha]}, ``scales`` {block.prev: (K,) scales folded},
    ``clips`` {layer: (N, G) shrink ratios} and ``clip_max`` {layer: (N, G) max values}."""

    GRAMS = False
    DISTRIBUTED = False  # its own statistics are not all-reduced yet
    APPLIES_CONSTRAINTS = True

    def __init__(self, config):
        super().__init__(config)
        self.alphas: dict[str, float] = {}
        self.losses: dict[str, list[float]] = {}
        self.clips: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}
        self.clip_max: dict[str, torch.Tensor] = {}
        self._clip_max: dict[str, dict[str, torch.Tensor]] = {}

    def _group(self, ctx: BlockContext, rel: str, k: int) -> int | None:
        cfg = ctx.layers[rel]
        g = self.group_for(ctx.full_name(rel), cfg, k)
        return None if g is not None and k % g else g

    def process_block(self, ctx: BlockContext) -> None:
        if not ctx.inputs:
            return
        for prev, nexts in ctx.pairs:
            if any(n in ctx.layers for n in nexts):
                self.search_pair(ctx, prev, nexts)
        if self.config.clip:
            self.clip_block(ctx)

    def quantize_block(self, ctx: BlockContext, log) -> None:
        """Clamps the weights to the clip ranges found, then quantizes: the clamp comes after
        the pipeline took this block's outputs for the next block, so (``inputs="float"``)
        every block is searched on the float model's activations, as llm-awq's run_awq (the
        next block's inputs are computed before auto_scale / auto_clip)."""
        for rel, mx in self._clip_max.pop(ctx.name, {}).items():
            lin = ctx.block.get_submodule(rel)
            w = lin.weight.detach().float()
            lim = mx.unsqueeze(-1)
            wc = torch.minimum(torch.maximum(w.reshape(w.shape[0], mx.shape[1], -1), -lim),
                               lim)
            with torch.no_grad():
                lin.weight.copy_(wc.reshape(w.shape).to(lin.weight.dtype))
        super().quantize_block(ctx, log)

    # ---- scale search ------------------------------------------------------------------------

    def search_pair(self, ctx: BlockContext, prev: str, nexts: list[str]) -> torch.Tensor:
        """Scores every alpha on one pair, folds the best scales into ``ctx.block`` and
        returns them (float64, (K,))."""
        cfg = self.config
        block = ctx.block
        target = inspect_target(block, prev, nexts, cfg.objective)
        linear_target = bool(target) and type(block.get_submodule(target)) is nn.Linear
        recorded, x_mean, xx = _capture(block, ctx.inputs, target, nexts[0], linear_target)
        w_mean = None
        if cfg.duo_scaling:
            w_mean = weight_mean([block.get_submodule(n).weight for n in nexts],
                                 self._group(ctx, nexts[0], x_mean.numel())
                                 if nexts[0] in ctx.layers else cfg.group_size)
        alphas = torch.arange(cfg.n_grid, dtype=torch.float64) / cfg.n_grid
        scales = awq_scales(x_mean, alphas, w_mean)
        quant = [n for n in nexts if n in ctx.layers]
        if linear_target:
            losses = self._linear_losses(ctx, target, scales, xx)
        else:
            losses = self._module_losses(ctx, target, quant, scales, recorded)
        best = int(torch.tensor(losses).argmin())  # the first minimum, as llm-awq
        key = f"{ctx.name}.{prev}"
        self.alphas[key] = float(alphas[best])
        self.losses[key] = losses
        self.scales[key] = scales[best].clone()
        fold_scales(block, prev, nexts, scales[best])
        return scales[best]

    def _chunks(self, n_alpha: int, numel: int):
        step = max(1, _CHUNK // max(1, numel))
        return [(i, min(n_alpha, i + step)) for i in range(0, n_alpha, step)]

    def _linear_losses(self, ctx: BlockContext, rel: str, scales: torch.Tensor,
                       xx: torch.Tensor) -> list[float]:
        """Mean squared output error of one linear per alpha, ``mean_o d_o E[x x^T] d_o^T``
        with ``d = W - Q(W s) / s`` (exact over the calibration tokens, batched over alphas)."""
        lin = ctx.block.get_submodule(rel)
        w = lin.weight.detach().float()
        c = ctx.layers[rel]
        g = self._group(ctx, rel, w.shape[1])
        out = []
        for a, b in self._chunks(len(scales), w.numel()):
            d = w.double().unsqueeze(0) - _scaled_candidates(w, scales[a:b], c.bits, g,
                                                             c.sym, c.constraints).double()
            out += (((d @ xx) * d).sum((1, 2)) / w.shape[0]).tolist()
        return out

    def _module_losses(self, ctx: BlockContext, target: str, quant: list[str],
                       scales: torch.Tensor, recorded: list[Batch]) -> list[float]:
        """Mean squared error of module ``target``'s output (the block when "") with the
        pair's quantized linears taking ``Q(W s) / s``, one forward pass per alpha."""
        mod = ctx.block.get_submodule(target) if target else ctx.block
        lins = {n: ctx.block.get_submodule(n) for n in quant}
        orig = {n: m.weight.detach().clone() for n, m in lins.items()}
        with torch.no_grad():
            ref = [_first(call_model(mod, b)) for b in recorded]
        total = sum(r.numel() for r in ref)
        losses: list[float] = []
        try:
            numel = max(o.numel() for o in orig.values())
            for a, b in self._chunks(len(scales), numel):
                cands = {}
                for n, w in orig.items():
                    c = ctx.layers[n]
                    cands[n] = _scaled_candidates(w.float(), scales[a:b], c.bits,
                                                  self._group(ctx, n, w.shape[1]), c.sym,
                                                  c.constraints)
                for j in range(b - a):
                    with torch.no_grad():
                        for n, m in lins.items():
                            m.weight.copy_(cands[n][j])
                        err = 0.0
                        for r, batch in zip(ref, recorded):
                            d = _first(call_model(mod, batch)) - r
                            err += float(torch.sum(d * d, dtype=torch.float64))
                    losses.append(err / max(1, total))
        finally:
            with torch.no_grad():
                for n, m in lins.items():
                    m.weight.copy_(orig[n])
        return losses

    # ---- clip search -------------------------------------------------------------------------

    def clip_block(self, ctx: BlockContext) -> None:
        """The max-value shrink search on every quantized linear but q/k; the chosen ranges
        are kept and the weights clamped by :meth:`quantize_block`."""
        names = [n for n in ctx.layers if n.rpartition(".")[2] not in CLIP_SKIP
                 and not (ctx.layers[n].constraints or _NONE).per_tensor]
        if not names:
            return
        groups = {}
        for n in names:
            k = ctx.block.get_submodule(n).in_features
            g = self._group(ctx, n, k)
            groups[n] = k if g is None else g
        blocks = clip_grams(ctx.block, ctx.inputs, groups, self.config.clip_tokens)
        ratios = clip_ratios(self.config.clip_grid, self.config.max_shrink)
        for n in names:
            lin = ctx.block.get_submodule(n)
            c = ctx.layers[n]
            w = lin.weight.detach().float()
            gs = groups[n]
            mx, r = clip_search(w, blocks[n], c.bits, None if gs == w.shape[1] else gs,
                                c.sym, ratios, c.constraints)
            self._clip_max.setdefault(ctx.name, {})[n] = mx
            self.clips[ctx.full_name(n)] = r
            self.clip_max[ctx.full_name(n)] = mx


def _token_count(block: nn.Module, inputs: list[Batch], name: str) -> int:
    n = [0]

    def f(mod, args):
        n[0] += _rows(args[0]).shape[0]

    h = block.get_submodule(name).register_forward_pre_hook(f)
    try:
        with torch.no_grad():
            for b in inputs:
                call_model(block, b)
    finally:
        h.remove()
    return n[0]


def clip_grams(block: nn.Module, inputs: list[Batch], groups: dict[str, int],
                 tokens: int | None = None) -> dict[str, torch.Tensor]:
    """{linear: (G, g, g) float64 ``E[x_g x_g^T]``}: the diagonal blocks of each named
    linear's input second moment, groups of ``groups[name]`` columns; ``tokens``: over every
    ``T // tokens``-th of the T calibration tokens (llm-awq's ``[0::T // 512]``)."""
    acc: dict[str, list] = {n: [None, 0, 0] for n in groups}
    step = 1
    if tokens is not None and groups:
        step = max(1, _token_count(block, inputs, next(iter(groups))) // tokens)

    def hook(n):
        def f(mod, args):
            x = _rows(args[0]).double()
            first = (-acc[n][2]) % step
            acc[n][2] += x.shape[0]
            x = x[first::step]
            g = groups[n]
            xg = x.reshape(x.shape[0], -1, g).transpose(0, 1)  # (G, T, g)
            h = xg.transpose(1, 2) @ xg
            acc[n][0] = h if acc[n][0] is None else acc[n][0] + h
            acc[n][1] += x.shape[0]
        return f

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in groups]
    try:
        with torch.no_grad():
            for b in inputs:
                call_model(block, b)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, (h, cnt, _) in acc.items():
        if h is None:
            raise ValueError(f"{n}: the layer did not run on the calibration data")
        out[n] = h / cnt
    return out
