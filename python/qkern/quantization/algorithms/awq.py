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

from ..blocks import fold_scales
from ..calibration import call_model
from ..constraints import HardwareConstraints
from ..distributed import all_batches, all_reduce_sum, batch_indices, sum_batches
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
from .awq_math import (
    CHUNK,
    awq_scales,
    clip_quantize,
    clip_ratios,
    clip_search,
    pseudo_quantize,
    weight_mean,
)

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
    """Runs ``block`` on ``inputs`` (this rank's shard) once: the inputs of module ``target``
    (one Batch each; ``inputs`` for the block) with the batch each came from, and over all
    ranks' tokens the mean |x| of linear ``first``'s input (summed batch after batch in the
    calibration list's order: ``distributed.sum_batches``) and, when ``gram``, ``X^T X / N``
    (all-reduced)."""
    got: list[Batch] = []
    where: list[int] = []
    st: dict = {"abs": {}, "n": 0, "xx": None, "b": 0}

    def lin_hook(mod, args):
        x = _rows(args[0]).float()
        a = x.abs().sum(0, dtype=torch.float64)
        j = st["b"]
        st["abs"][j] = st["abs"][j] + a if j in st["abs"] else a
        st["n"] += x.shape[0]
        if gram:
            xx = (x.T @ x).double()
            st["xx"] = xx if st["xx"] is None else st["xx"] + xx

    def mod_hook(mod, args, kwargs):
        got.append(Batch(tuple(args), dict(kwargs)))
        where.append(st["b"])

    handles = [block.get_submodule(first).register_forward_pre_hook(lin_hook)]
    if target and not gram:
        handles.append(block.get_submodule(target).register_forward_pre_hook(
            mod_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for j, b in enumerate(inputs):
                st["b"] = j
                call_model(block, b)
    finally:
        for h in handles:
            h.remove()
    if st["n"] == 0:
        raise ValueError(f"{first}: the layer did not run on the calibration data")
    k = next(iter(st["abs"].values())).numel()
    zero = torch.zeros(k, dtype=torch.float64)
    sums = sum_batches(torch.stack([st["abs"].get(j, zero) for j in range(len(inputs))]))
    n = int(all_reduce_sum(torch.tensor(st["n"], dtype=torch.int64)))
    recorded = (got, where) if target else (list(inputs), list(range(len(inputs))))
    xx = None if st["xx"] is None else all_reduce_sum(st["xx"]) / n
    return recorded, sums / n, xx


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
        step = max(1, CHUNK // max(1, numel))
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
                       scales: torch.Tensor, recorded: tuple[list[Batch], list[int]]
                       ) -> list[float]:
        """Mean squared error of module ``target``'s output (the block when "") with the
        pair's quantized linears taking ``Q(W s) / s``, one forward pass per alpha; the squared
        errors are summed per batch, then over all ranks' batches in the calibration list's
        order (every rank gets the same losses, bit for bit one process's)."""
        recorded, where = recorded
        mod = ctx.block.get_submodule(target) if target else ctx.block
        lins = {n: ctx.block.get_submodule(n) for n in quant}
        orig = {n: m.weight.detach().clone() for n, m in lins.items()}
        with torch.no_grad():
            ref = [_first(call_model(mod, b)) for b in recorded]
        total = int(all_reduce_sum(torch.tensor(sum(r.numel() for r in ref))))
        errs = torch.zeros(len(ctx.inputs), len(scales), dtype=torch.float64)
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
                        for r, batch, i in zip(ref, recorded, where):
                            d = _first(call_model(mod, batch)) - r
                            errs[i, a + j] += torch.sum(d * d, dtype=torch.float64)
        finally:
            with torch.no_grad():
                for n, m in lins.items():
                    m.weight.copy_(orig[n])
        return (sum_batches(errs) / max(1, total)).tolist()

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


def _token_counts(block: nn.Module, inputs: list[Batch], names: list[str]
                  ) -> dict[str, torch.Tensor]:
    """{linear: (B,) int64 tokens of its input in each batch}."""
    cnt = {n: torch.zeros(len(inputs), dtype=torch.int64) for n in names}
    cur = [0]

    def hook(n):
        def f(mod, args):
            cnt[n][cur[0]] += _rows(args[0]).shape[0]
        return f

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for j, b in enumerate(inputs):
                cur[0] = j
                call_model(block, b)
    finally:
        for h in handles:
            h.remove()
    return cnt


def clip_grams(block: nn.Module, inputs: list[Batch], groups: dict[str, int],
                 tokens: int | None = None) -> dict[str, torch.Tensor]:
    """{linear: (G, g, g) float64 ``E[x_g x_g^T]``}: the diagonal blocks of each named
    linear's input second moment, groups of ``groups[name]`` columns; ``tokens``: over every
    ``T // tokens``-th of the T calibration tokens (llm-awq's ``[0::T // 512]``). Distributed:
    T and each batch's first token are counted over the full calibration list, so the ranks
    take the tokens one process would, and the sums are all-reduced."""
    acc: dict[str, list] = {n: [None, 0, 0] for n in groups}
    step, starts = 1, None
    if tokens is not None and groups:
        every = {n: all_batches(c) for n, c in _token_counts(block, inputs, list(groups)
                                                                ).items()}
        step = max(1, int(every[next(iter(groups))].sum()) // tokens)
        mine = batch_indices(len(inputs))
        starts = {n: (torch.cumsum(c, 0) - c)[mine].tolist() for n, c in every.items()}

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
            for j, b in enumerate(inputs):
                for n in acc if starts is not None else ():
                    acc[n][2] = starts[n][j]  # the batch's first token in the full list
                call_model(block, b)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, (h, cnt, _) in acc.items():
        if h is None:
            raise ValueError(f"{n}: the layer did not run on the calibration data")
        out[n] = all_reduce_sum(h) / int(all_reduce_sum(torch.tensor(cnt)))
    return out
