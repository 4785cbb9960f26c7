"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): each weight column is rounded in turn and the rounding error is
spread over the columns not yet quantized with the Optimal Brain Surgeon update
``W[:, F] -= (w_q - quant(w_q)) / [H_F^-1]_qq * [H_F^-1]_{q, F}``, ``H = 2 X X^T`` the Hessian
of the layer's squared output error ``||W X - Q X||^2``.

:func:`gptq_quantize` is the algorithm on tensors (a weight matrix and the Gram matrix
``X^T X / N`` of the layer's inputs); :func:`gptq_linear` builds the :class:`QuantLinear`.
As published (IST-DASLab/gptq): dead inputs (``H_ii = 0``) get ``H_ii = 1`` and a zero
weight; damping adds ``damp_percent * mean(diag H)`` to the diagonal; columns are processed
in blocks of ``block_size`` with lazy (batched) updates of the later columns; a group's scale
is computed when its first column comes up, from the error-updated weights, or up front from
the original weights with ``static_groups``; ``act_order`` processes columns by decreasing
``H_ii``.

The paper's Cholesky form uses the upper Cholesky factor ``U`` of ``H^-1``. ``U = R^-1`` for
the "reversed" Cholesky factorisation ``H = R R^T`` (``R`` upper), and the updates in ``U``
rewrite without the inverse: with ``D = W_orig - Q``, column ``j`` is rounded from
``w_j = w_orig_j + (sum_{i<j} D_i R_ij) / R_jj`` (the OBS error of column ``j`` is
``(w_j - q_j) R_jj``). One Cholesky factorisation, no inverse: the rest is the lazy update
``N K^2`` flops of torch BLAS plus a short per-column loop vectorised over the rows.

The grid is exactly qkern's ``int{bits}`` (docs/numerics.md): symmetric ``scale = amax / qmax``
with codes in ``[qmin, qmax]``, asymmetric min/max with an integer zero point; scales are
computed by :func:`qkern.quantize` itself, so the QuantLinear reproduces the weight bit for
bit. qkern's kernels store contiguous groups along the input dim (no ``g_idx``), so
``act_order`` with groups needs ``static_groups=True`` (groups stay contiguous in the original
column order, only the processing order changes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ... import formats as QF
from ...layout import Layout
from ...nn import QuantLinear
from ...quantize import quantize
from ...tensor import QTensor
from ..constraints import HardwareConstraints, fit_l1_budget, grid_params
from ..registry import (
    BaseConfig,
    check_bool,
    check_group,
    check_int,
    check_real,
    config_class,
    register_quantizer,
)
from ..sequential import SequentialQuantizer, check_weight_bits

__all__ = ["GPTQConfig", "GPTQQuantizer", "GPTQResult", "gptq_linear", "gptq_quantize",
           "output_error"]

BITS = (2, 3, 4, 5, 6, 7, 8)


@config_class
@dataclass
class GPTQConfig(BaseConfig):
    """GPTQ weight-only quantization to qkern's ``int{bits}`` grid (the paper's defaults:
    1 % damping, blocks of 128 columns, true-sequential order inside a transformer block).
    ``group_size`` None is one scale per output channel; ``act_order`` (columns by
    decreasing ``H_ii``) with a group size needs ``static_groups=True``."""

    bits: int = 4
    group_size: int | None = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    true_sequential: bool = True

    FORMAT_FIELD: ClassVar[str] = "bits"

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_weight_bits(self)
        for f in ("act_order", "static_groups", "true_sequential"):
            check_bool(n, f, getattr(self, f))
        check_real(n, "damp_percent", self.damp_percent, 0.0, 1.0, "a number in [0, 1]")
        check_int(n, "block_size", self.block_size, 1)
        if self.act_order and self.group_size is not None and not self.static_groups:
            raise ValueError(ACT_ORDER_MESSAGE.format(n=n + "."))
        super().__post_init__()


ACT_ORDER_MESSAGE = (
    "{n}act_order=True with a group_size needs static_groups=True: qkern's kernels store "
    "contiguous groups (no g_idx), so the groups must be fixed, in the original column order, "
    "before the columns are processed by decreasing H_ii")


def check_bits(cls_name: str, bits) -> None:
    """``bits`` must be an int in 2..8 (qkern's ``int2`` .. ``int8``)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{cls_name}.bits must be an int in 2..8, got {bits!r}")


@dataclass(frozen=True)
class GPTQResult:
    """What :func:`gptq_quantize` returns. ``weight`` (out, in) float32 is the dequantized
    weight ``(codes - zero_point) * scale``; ``scale`` / ``zero_point`` are in qkern's layout
    (``(out, in // group_size)``: groups along the input dim, or ``(out,)`` per channel);
    ``codes`` int8 (out, in); ``loss`` the OBS losses ``sum_j ||w_j - q_j||^2 / (2 U_jj^2)``,
    which add up to ``||W X - Q X||^2 / N`` on the damped Hessian."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    codes: torch.Tensor
    fmt: str
    group_size: int | None
    loss: float

    def qtensor(self, dtype: torch.dtype = torch.float32) -> QTensor:
        """The result as a :class:`QTensor` (what :class:`QuantLinear` takes). Per-channel
        scales of 2..4-bit weights are stored as one group spanning the row when the tiled
        int2..int4 kernels take it (K a multiple of 32), so the layer runs on them."""
        shape = tuple(self.codes.shape)
        f = QF.get(self.fmt)
        sc, zp = self.scale, self.zero_point
        if self.group_size is None and (f.bits > 4 or shape[1] % 32):
            lay = Layout("channel", shape, 0, max(shape[1], 1))
        else:
            g = shape[1] if self.group_size is None else self.group_size
            lay = Layout("group", shape, 1, g)
            sc = sc.reshape(lay.scale_shape)
            zp = None if zp is None else zp.reshape(lay.scale_shape)
        return QTensor(self.codes, sc, zp, f, lay, dtype=dtype)


def _finite(t: torch.Tensor) -> bool:
    """All elements finite (a float64 sum first: finite for finite data of sane size)."""
    return bool(torch.isfinite(t.sum(dtype=torch.float64))) or bool(torch.isfinite(t).all())


def _check_inputs(w, gram, bits, group_size, sym, act_order, static_groups, damp_percent,
                  block_size) -> None:
    n = "gptq_quantize: "
    if not isinstance(w, torch.Tensor) or not isinstance(gram, torch.Tensor):
        raise TypeError(f"{n}w and gram must be torch tensors")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{n}w must be a 2-D float (out, in) matrix, got {w.dim()}-D {w.dtype}")
    k = w.shape[1]
    if tuple(gram.shape) != (k, k) or not gram.is_floating_point():
        raise ValueError(f"{n}gram must be a float ({k}, {k}) matrix for w of shape "
                         f"{tuple(w.shape)}, got {tuple(gram.shape)} {gram.dtype}")
    if w.device != gram.device:
        raise ValueError(f"{n}w is on {w.device} but gram on {gram.device}")
    if not _finite(w):
        raise ValueError(f"{n}w contains NaN or Inf")
    if not _finite(gram):
        raise ValueError(f"{n}gram contains NaN or Inf")
    if bool((gram.diagonal() < 0).any()):
        raise ValueError(f"{n}gram has a negative diagonal entry: it must be X^T X / N")
    check_bits("gptq_quantize", bits)
    check_group("gptq_quantize", "group_size", group_size)
    if group_size is not None and k % group_size:
        raise ValueError(f"{n}group_size={group_size} does not divide in_features={k}; "
                         "pass group_size=None for per-channel scales")
    for name, v in (("sym", sym), ("act_order", act_order), ("static_groups", static_groups)):
        check_bool("gptq_quantize", name, v)
    check_real("gptq_quantize", "damp_percent", damp_percent, 0.0, 1.0, "a number in [0, 1]")
    check_int("gptq_quantize", "block_size", block_size, 1)
    if act_order and group_size is not None and not static_groups:
        raise ValueError(ACT_ORDER_MESSAGE.format(n=n))


def _params(wt: torch.Tensor, fmt: str, sym: bool, c: HardwareConstraints | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """qkern's scale and zero point (int32; 0 when symmetric) per row of ``wt`` (rows, cols);
    under hardware constraints ``c`` the grid of ``constraints.grid_params`` (power-of-two,
    per-tensor, symmetric), chosen before any column of the group is rounded."""
    if c is not None and c.touches_weights():
        s, z = grid_params(wt, fmt, c, sym, None, "gptq_quantize")
        return s, torch.zeros_like(s, dtype=torch.int32) if z is None else z
    q = quantize(wt.float(), fmt, granularity="channel", axis=0, symmetric=sym)
    zp = torch.zeros_like(q.scale, dtype=torch.int32) if q.zero_point is None else q.zero_point
    return q.scale, zp


def _static_params(w0: torch.Tensor, fmt: str, sym: bool, group_size: int | None,
                   c: HardwareConstraints | None = None):
    """Scales / zero points (groups, out) from the original weights (groups: contiguous
    column blocks in the original order; one group when per channel). With an accumulator
    bound (per channel), each row's scale is coarsened until its round-to-nearest codes fit
    the l1 budget (``constraints.fit_l1_budget``)."""
    k = w0.shape[1]
    g = k if group_size is None else group_size
    out = [_params(w0[:, i:i + g], fmt, sym, c) for i in range(0, k, g)]
    sc, zp = torch.stack([s for s, _ in out]), torch.stack([z for _, z in out])
    if c is not None and c.accumulator_bits is not None:
        sc = fit_l1_budget(w0.float(), sc[0], fmt, c)[0].unsqueeze(0)
    return sc, zp


def _reversed_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper ``R`` with ``H = R R^T`` (the Cholesky factor of the reversed matrix, reversed):
    ``R^-1`` is the upper Cholesky factor of ``H^-1`` the paper uses."""
    m, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info) != 0:
        raise ValueError("gptq_quantize: H + damping is not positive definite (gram must be "
                         "X^T X / N of the layer's inputs; a larger damp_percent helps)")
    return m.flip(0, 1)


def gptq_quantize(w: torch.Tensor, gram: torch.Tensor, *, bits: int = 4,
                  group_size: int | None = 128, sym: bool = True, act_order: bool = False,
                  static_groups: bool = False, damp_percent: float = 0.01,
                  block_size: int = 128, dtype: torch.dtype = torch.float32,
                  constraints: HardwareConstraints | None = None) -> GPTQResult:
    """GPTQ of weight ``w`` (out, in) given ``gram = X^T X / N`` (in, in) of the layer's
    inputs, onto qkern's ``int{bits}`` grid (module docstring). ``dtype``: the arithmetic of
    the updates (float32 as the reference implementation; float64 for checks).
    ``constraints`` (docs/hardware.md): every group's grid from ``constraints.grid_params``
    (so the error feedback sees the constrained grid); ``per_tensor`` / ``accumulator_bits``
    need ``group_size=None``; with ``accumulator_bits`` the weights are symmetric and the
    column loop keeps each row's l1 norm of integer weights within the budget."""
    _check_inputs(w, gram, bits, group_size, sym, act_order, static_groups, damp_percent,
                  block_size)
    c = HardwareConstraints.coerce(constraints)
    budget = None
    if c is not None:
        if group_size is not None and (c.per_tensor or c.accumulator_bits is not None):
            raise ValueError("gptq_quantize: per_tensor / accumulator_bits constraints need "
                             f"group_size=None (one scale per layer / row), got {group_size}")
        sym = sym or c.symmetric or c.accumulator_bits is not None
        budget = c.l1_budget()
    fmt = f"int{bits}"
    f = QF.get(fmt)
    n_out, k = w.shape
    with torch.no_grad():
        w0 = w.detach().to(dtype).clone()
        h = gram.detach().to(dtype) * 2.0  # the paper's H = 2 X X^T (per sample)
        dead = h.diagonal() == 0
        if bool(dead.any()):
            h[dead, dead] = 1.0
            w0[:, dead] = 0.0
        dynamic = group_size is not None and not static_groups
        params = None if dynamic else _static_params(w0, fmt, sym, group_size, c)
        perm = None
        if act_order:
            perm = torch.argsort(h.diagonal(), descending=True, stable=True)
            w0 = w0[:, perm]
            h = h[perm][:, perm]
        h.diagonal().add_(damp_percent * h.diagonal().mean())
        r = _reversed_cholesky(h)
        out = _sweep(w0.T.contiguous(), r, f, fmt, sym, group_size, params, perm, block_size,
                     c, budget)
    q, codes, scale, zp, loss = out
    if perm is not None:
        inv = torch.argsort(perm)
        q, codes = q[inv], codes[inv]
    return GPTQResult(q.T.contiguous(), scale, None if sym else zp, codes.T.contiguous(), fmt,
                      group_size, loss)


def _bounds(k: int, block_size: int, group_size: int | None, dynamic: bool) -> list[int]:
    """Block boundaries: every ``block_size`` columns, and every group start when groups are
    dynamic (so a group's columns are all up to date when its scale is computed)."""
    cuts = set(range(0, k, block_size))
    if dynamic:
        cuts |= set(range(0, k, group_size))
    return [*sorted(cuts), k]


def _sweep(w0t, r, f, fmt, sym, group_size, params, perm, block_size, c=None, budget=None):
    """The column loop on ``w0t`` (in, out), columns in processing order. Returns the
    dequantized weight and the codes (in, out, processing order), scale / zero point in
    qkern's layout, and the loss. ``budget``: the l1 budget of each row's integer weights;
    a column's code is clamped to what the row has left (``|q_j| <= budget - sum_{i<j}
    |q_i|``) before its error is fed back."""
    k, n = w0t.shape
    dt = w0t.dtype
    dynamic = params is None
    n_groups = 1 if group_size is None else k // group_size
    if dynamic:
        sc_t = torch.empty(n_groups, n, dtype=torch.float32)
        zp_t = torch.empty(n_groups, n, dtype=torch.int32)
    else:
        sc_t, zp_t = params
    # per group: 1/scale, the clamp range of round(t) (qmin - zp .. qmax - zp), the scale
    rinv_t, lo_t, hi_t = 1.0 / sc_t, (f.qmin - zp_t).float(), (f.qmax - zp_t).float()
    if group_size is None:
        gidx = [0] * k
    elif perm is None:
        gidx = [j // group_size for j in range(k)]
    else:
        gidx = (perm // group_size).tolist()
    rdiag = r.diagonal()
    inv_rd = (1.0 / rdiag).tolist()
    acc = torch.zeros_like(w0t)            # C_j = sum_{i<j} D_i R_ij, D = W_orig - Q
    deq = torch.empty(k, n, dtype=torch.float32)
    rq = torch.empty(k, n, dtype=torch.float32)  # round(t) clamped: code - zero point
    cur = torch.empty(min(block_size, k), n, dtype=dt)  # the weights the block rounds
    d_buf = torch.empty_like(cur)                        # their D = W_orig - Q
    loss = 0.0
    bounds = _bounds(k, block_size, group_size, dynamic)
    w0_rows, rq_rows, deq_rows = w0t.unbind(0), rq.unbind(0), deq.unbind(0)
    sc_rows, rinv_rows, lo_rows, hi_rows = (t.unbind(0) for t in (sc_t, rinv_t, lo_t, hi_t))
    wide = dt != torch.float32
    left = None if budget is None else torch.full((n,), float(budget))
    for i1, i2 in zip(bounds[:-1], bounds[1:]):
        if dynamic and i1 % group_size == 0:
            gi = i1 // group_size
            cols = slice(i1, i1 + group_size)
            # the group's weights as the OBS updates of columns < i1 left them (not yet
            # those of its own columns): W_orig + C U with U = R^-1 (upper, so only the
            # group's own rows of C and its diagonal block of R enter)
            rg = r[cols, cols]
            ug = torch.linalg.solve_triangular(rg, torch.eye(len(rg), dtype=dt), upper=True)
            wg = torch.addmm(w0t[cols], ug.T, acc[cols])
            s, z = _params(wg.T, fmt, sym, c)
            sc_t[gi], zp_t[gi] = s, z
            rinv_t[gi], lo_t[gi], hi_t[gi] = 1.0 / s, (f.qmin - z).float(), (f.qmax - z).float()
        rb, nb = r[i1:i2, i1:i2], i2 - i1
        a1, d1, c1 = acc[i1:i2], d_buf[:nb], cur[:nb]
        rows_a, rows_d, rows_c = a1.unbind(0), d1.unbind(0), c1.unbind(0)
        for i in range(nb):  # the per-column work: 7 torch ops over the rows
            j = i1 + i
            g = gidx[j]
            wj = torch.add(w0_rows[j], rows_a[i], alpha=inv_rd[j], out=rows_c[i])
            t = torch.mul(wj.float() if wide else wj, rinv_rows[g], out=rq_rows[j])
            t.round_()
            if sym:
                t.clamp_(f.qmin, f.qmax)
            else:
                torch.clamp(t, lo_rows[g], hi_rows[g], out=t)
            if left is not None:
                torch.clamp(t, -left, left, out=t)
                left.sub_(t.abs())
            dq = torch.mul(t, sc_rows[g], out=deq_rows[j])
            dj = torch.sub(w0_rows[j], dq, out=rows_d[i])
            if i + 1 < nb:
                a1[i + 1:].addr_(rb[i, i + 1:], dj)
        if i2 < k:
            acc[i2:].addmm_(r[i1:i2, i2:].T, d1)
        err = (c1 - deq[i1:i2].to(dt)) * rdiag[i1:i2, None]  # OBS errors (w_j - q_j) / U_jj
        loss += 0.5 * float(err.square().sum(dtype=torch.float64))
    zcol = zp_t[torch.tensor(gidx, dtype=torch.long)] if group_size is not None else zp_t[0]
    codes = (rq + zcol.float()).to(torch.int8)
    if group_size is None:
        scale, zp = sc_t[0].clone(), zp_t[0].clone()
    else:
        scale, zp = sc_t.T.contiguous(), zp_t.T.contiguous()
    return deq, codes, scale, zp, loss


def gptq_linear(linear: nn.Linear, gram: torch.Tensor, cfg: GPTQConfig,
                **kw) -> QuantLinear:
    """A :class:`QuantLinear` holding the GPTQ-quantized weight of ``linear`` (its bias kept);
    ``gram`` is ``X^T X / N`` of the layer's inputs; ``kw`` goes to :func:`gptq_quantize`
    (over the config's fields).
    Its dequantized weight is the result's ``weight`` bit for bit."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"gptq_linear expects an nn.Linear, got {type(linear).__name__}")
    if not isinstance(cfg, GPTQConfig):
        raise TypeError(f"gptq_linear expects a GPTQConfig, got {type(cfg).__name__}")
    args = {"bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
            "act_order": cfg.act_order, "static_groups": cfg.static_groups,
            "damp_percent": cfg.damp_percent, "block_size": cfg.block_size,
            "constraints": cfg.constraints, **kw}
    res = gptq_quantize(linear.weight, gram, **args)
    bias = None if linear.bias is None else linear.bias.detach()
    return QuantLinear(res.qtensor(linear.weight.dtype), bias)


def output_error(w: torch.Tensor, q: torch.Tensor, gram: torch.Tensor) -> float:
    """``||W X - Q X||^2 / N = sum_rows (w - q) gram (w - q)^T`` (float64)."""
    d = (w.double() - q.double())
    return float(((d @ gram.double()) * d).sum())



@register_quantizer(GPTQConfig)
class GPTQQuantizer(SequentialQuantizer):
    """GPTQ in the block-by-block pipeline: each linear of a block is quantized with the Gram
    matrix of its inputs measured on the partially quantized block (true-sequential groups:
    q/k/v, o, gate/up, down), so later layers absorb the error of earlier ones."""

    GRAMS = True
    NEEDS_DATA = True
    APPLIES_CONSTRAINTS = True

    def quantize_layer(self, name: str, linear: nn.Linear, gram: torch.Tensor | None,
                       cfg) -> nn.Module:
        if gram is None:
            raise ValueError(f"{name}: GPTQ needs the Gram matrix X^T X / N of the layer's "
                             "calibration inputs")
        k = linear.in_features
        group = cfg.group_size
        if group is not None and k % group:
            self.notes[name] = (f"group_size {group} does not divide its input size {k}: "
                                "quantized per output channel")
            group = None
        return gptq_linear(linear, gram, cfg, group_size=group)
