"""HQQ: Half-Quadratic Quantization (Badri & Shaji 2023), data-free weight-only quantization.

Per group of ``group_size`` consecutive weights along the input dimension, an asymmetric
min-max init ``s = (max - min) / (2^b - 1)``, ``z = -min / s``, then the zero point alone is
optimised for the sparsity-promoting l_p error (p < 1) of the dequantized weights by
half-quadratic splitting, with the scale kept fixed:

    W_q = clamp(round(W / s + z), 0, 2^b - 1),   W_r = (W_q - z) * s
    W_e = shrink_lp(W - W_r, beta)   = sign(x) * relu(|x| - |x|^(p-1) / beta),  x = W - W_r
    z   = mean_group(W_q - (W - W_e) / s),        beta <- kappa * beta

(the generalized soft-thresholding of the l_p proximal step; the paper's defaults p = 0.7,
beta = 10, kappa = 1.01, 20 iterations, early stopping). No calibration data. The zero point
is a float, so the codes are unsigned (``uint{b}``) and the layer runs on the fused
``gemm_w4`` / ``gemm_w23`` kernels with float zero points: its weights are exactly
``(W_q - z) * s`` in float32.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ... import formats as QF
from ...layout import Layout
from ...nn import QuantLinear
from ...tensor import QTensor
from ..constraints import HardwareConstraints, grid_params
from ..registry import (
    BaseConfig,
    check_bool,
    check_choice,
    check_group,
    check_int,
    check_real,
    config_class,
    fail,
    register_quantizer,
)
from ..sequential import SequentialQuantizer

__all__ = ["HQQConfig", "HQQQuantizer", "HQQResult", "hqq_linear", "hqq_quantize", "shrink_lp"]

BITS = (2, 3, 4, 8)


@config_class
@dataclass
class HQQConfig(BaseConfig):
    """HQQ with the paper's / the hqq package's defaults: 4 bits in groups of 64 along the
    input dimension (``axis=1``), 20 iterations of the proximal solver on the l_0.7 error with
    beta = 10 growing by kappa = 1.01 per iteration, stopping at the first iteration that does
    not lower the error. ``round_zero``: start from the rounded min-max zero point (the hqq
    package's default for 4 bits, None; the paper starts from the float one).
    ``group_size=None``: one group per output row. In the LLM pipeline
    (``quantize_model`` on a transformers model) only the linears inside transformer blocks
    are quantized, and no calibration data is needed."""

    bits: int = 4
    group_size: int | None = 64
    sym: bool = False  # HQQ is asymmetric: the zero point is what it optimises
    axis: int = 1
    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    early_stop: bool = True
    round_zero: bool | None = None  # round the min-max zero point first (None: for 4 bits)
    mode: str = "exact"  # "fast": int8 activations per 32-block inside the w4 / w23 kernels

    FORMAT_FIELD = "bits"

    def __post_init__(self) -> None:
        n = type(self).__name__
        check_choice(n, "bits", self.bits, BITS)
        check_group(n, "group_size", self.group_size)
        if self.sym is not False:
            fail(n, "sym", "False (HQQ optimises the zero points; there is no symmetric HQQ)",
                 self.sym)
        check_hqq_params(n, self.axis, self.iters, self.lp_norm, self.beta, self.kappa)
        check_bool(n, "early_stop", self.early_stop)
        if self.round_zero is not None:
            check_bool(n, "round_zero", self.round_zero)
        check_choice(n, "mode", self.mode, ("exact", "fast"))
        super().__post_init__()


def check_hqq_params(n: str, axis, iters, lp_norm, beta, kappa) -> None:
    """The solver's settings (shared by HQQConfig and hqq_quantize)."""
    if axis != 1:
        fail(n, "axis", "1 (groups along the input dimension, the layout qkern's kernels "
             "run; hqq's axis=0 groups down the columns)", axis)
    check_int(n, "iters", iters, 0)
    check_real(n, "lp_norm", lp_norm, 0.1, 1.0, "a number in [0.1, 1] (the l_p norm's p)")
    check_real(n, "beta", beta, 1e-12, math.inf, "a positive number")
    check_real(n, "kappa", kappa, 1.0, math.inf, "a number >= 1 (beta's growth per step)")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalized soft-thresholding operator, the l_p proximal step of HQQ (eq. 6):
    ``sign(x) * relu(|x| - |x|^(p-1) / beta)`` (p = 1: the ordinary soft threshold)."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.pow(p - 1.0) / beta)


@dataclass
class HQQResult:
    """What :func:`hqq_quantize` found: unsigned codes (out, in) in [0, 2^bits - 1], float
    scales and zero points (out, in // group), and ``objective``: the l_p error
    ``sum |W - W_r|^p`` of the min-max init (entry 0) and after each iteration evaluated
    (``best`` indexes the iterate returned)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    objective: list[float] = field(default_factory=list)
    best: int = 0

    def dequantize(self) -> torch.Tensor:
        """``(W_q - z) * s`` in the scales' dtype, exactly as the kernels decode it."""
        n, k = self.codes.shape
        q = self.codes.to(self.scale.dtype).view(n, -1, self.group_size)
        return ((q - self.zero[..., None]) * self.scale[..., None]).view(n, k)

    def qtensor(self) -> QTensor:
        """A ``uint{bits}`` QTensor (groups along axis 1) with float32 scales and zero points."""
        n, k = self.codes.shape
        lay = Layout("group", (n, k), 1, self.group_size)
        return QTensor(self.codes.to(torch.uint8), self.scale.float(), self.zero.float(),
                       QF.get(f"uint{self.bits}"), lay)


def _lp(d: torch.Tensor, p: float) -> float:
    return float(d.abs().pow(p).sum())


def hqq_quantize(w: torch.Tensor, bits: int = 4, group_size: int | None = 64, *, axis: int = 1,
                 iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
                 early_stop: bool = True, round_zero: bool = False,
                 dtype: torch.dtype = torch.float32,
                 constraints: HardwareConstraints | None = None) -> HQQResult:
    """HQQ of a weight matrix ``w`` (out, in): min-max init, then the alternating proximal
    solver on the zero points (module docstring). ``early_stop``: stop at the first iteration
    whose l_p error is not below the best so far. The iterate with the lowest l_p error is
    returned. ``round_zero``: start from round(-min / s) instead of -min / s. ``dtype``: the
    arithmetic (float32 like the hqq package on CPU, or float64). ``constraints``: the
    (fixed) scales come from ``constraints.grid_params`` (qkern's min-max range, widened to
    hold 0; power of two and / or one per layer); the solver then optimises the float zero
    points as usual. Symmetric weights and an accumulator bound are refused: HQQ's weights
    are ``(q - z) s`` with a float zero point ``z``, which is what it optimises."""
    n_ = "hqq_quantize"
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"{n_}: w must be a floating-point tensor, got "
                        f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"{n_}: w must be a non-empty 2-D (out, in) matrix, got shape "
                         f"{tuple(w.shape)}")
    if bits not in BITS:
        raise ValueError(f"{n_}: bits must be one of {BITS}, got {bits!r}")
    check_group(n_, "group_size", group_size)
    check_hqq_params(n_, axis, iters, lp_norm, beta, kappa)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{n_}: dtype must be torch.float32 or torch.float64, got {dtype}")
    n, k = w.shape
    g = k if group_size is None else group_size
    if k % g:
        raise ValueError(f"{n_}: group_size={g} does not divide in_features={k}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{n_}: w contains NaN or Inf")
    c = HardwareConstraints.coerce(constraints)
    if c is not None and (c.symmetric or c.accumulator_bits is not None):
        raise ValueError(f"{n_}: HQQ optimises a float zero point per group; symmetric "
                         "weights / an accumulator bound (integer weights) leave it nothing "
                         "to optimise: use RTNConfig or GPTQConfig with these constraints")
    wg = w.detach().to(dtype).reshape(-1, g)
    qmax = float(2**bits - 1)
    lo, hi = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)
    if c is not None and c.touches_weights():
        s = grid_params(w.detach().float(), f"int{bits}", c, False, None if g == k else g,
                        n_)[0].to(dtype).reshape(-1, 1)
        lo = lo.clamp_max(0.0)  # the range grid_params covers
    else:
        s = (hi - lo) / qmax
        s = torch.where(s >= torch.finfo(torch.float32).tiny, s, torch.ones_like(s))  # flat
    z = -lo / s
    if round_zero:
        z = torch.round(z)
    objective: list[float] = []
    best_z, best = z, 0
    ws = wg / s  # s stays fixed: W / s once
    for it in range(iters + 1):
        q = torch.round(ws + z).clamp(0.0, qmax)
        err = wg - (q - z) * s
        objective.append(_lp(err, lp_norm))
        if objective[-1] < objective[best] or it == 0:
            best_z, best = z, it
        elif early_stop:
            break
        if it == iters:
            break
        we = shrink_lp(err, beta, lp_norm)
        z = (q - (wg - we) / s).mean(1, keepdim=True)
        beta *= kappa
    codes = torch.round(ws + best_z).clamp(0.0, qmax).to(torch.uint8)
    return HQQResult(codes.view(n, k), s.view(n, k // g), best_z.view(n, k // g), bits, g,
                     objective, best)


def hqq_linear(linear: nn.Linear, cfg: HQQConfig | None = None) -> QuantLinear:
    """``linear`` quantized with HQQ onto a QuantLinear (``uint{bits}``, float zero points:
    the fused w4 / w23 kernels for 4 / 2 / 3 bits). Its ``dequantize_weight()`` equals
    ``hqq_quantize(...).dequantize()`` in float32 exactly."""
    cfg = HQQConfig() if cfg is None else cfg
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"hqq_linear expects an nn.Linear, got {type(linear).__name__}")
    if not isinstance(cfg, HQQConfig):
        raise TypeError(f"hqq_linear expects an HQQConfig, got {type(cfg).__name__}")
    r = hqq_quantize(linear.weight.detach().float(), cfg.bits, cfg.group_size, axis=cfg.axis,
                     iters=cfg.iters, lp_norm=cfg.lp_norm, beta=cfg.beta, kappa=cfg.kappa,
                     early_stop=cfg.early_stop,
                     round_zero=cfg.bits == 4 if cfg.round_zero is None else cfg.round_zero,
                     constraints=cfg.constraints)
    return QuantLinear(r.qtensor(), linear.bias, mode=cfg.mode)


@register_quantizer(HQQConfig)
class HQQQuantizer(SequentialQuantizer):
    """HQQ on the linears of each transformer block through the sequential pipeline: no
    calibration data (with data, the per-layer log reports each layer's output error)."""

    GRAMS = False
    NEEDS_DATA = False
    APPLIES_CONSTRAINTS = True

    def check_constraints(self, cfg, name: str) -> None:
        """HQQ applies power-of-two and per-tensor scales; symmetric weights and an
        accumulator bound are refused (see :func:`hqq_quantize`)."""
        super().check_constraints(cfg, name)
        c = cfg.constraints
        if c is not None and (c.symmetric or c.accumulator_bits is not None):
            raise ValueError(f"HQQConfig (layer {name}): HQQ optimises a float zero point per "
                             "group, so it cannot give symmetric weights or integer weights "
                             "within an accumulator bound; use RTNConfig or GPTQConfig with "
                             "these constraints (HQQ applies pow2_scales and per_tensor)")

    def quantize_layer(self, name: str, linear: nn.Linear, gram: torch.Tensor | None,
                       cfg: HQQConfig) -> nn.Module:
        g = self.group_for(name, cfg, linear.in_features)
        return hqq_linear(linear, dataclasses.replace(cfg, group_size=g))

    def preflight(self, name: str, linear: nn.Linear, cfg: HQQConfig) -> str | None:
        """Why no fused kernel runs HQQ with ``cfg`` on ``linear``'s shape (None: one does);
        HQQ's float zero points run on the w4 / w23 kernels: 2, 3, 4 bits, groups of a multiple
        of 32. Such layers stay float, reported once."""
        probe = nn.Linear(linear.in_features, linear.out_features, bias=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                q = self.quantize_layer(name, probe, None, dataclasses.replace(cfg, iters=0))
            except ValueError as e:
                return str(e)
        self.notes.pop(name, None)
        if q.kernel_reason:
            return (f"no fused kernel runs it ({q.kernel_reason}); HQQ runs on the kernels at "
                    "2, 3 and 4 bits with groups of a multiple of 32")
        return None
