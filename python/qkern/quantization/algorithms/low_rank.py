"""Low-rank compensation of a quantized weight: ``W ~ Q + L R``.

- LoRC (ZeroQuant-V2, Yao et al., 2023, "Low Rank Compensation"): after any weight-only
  method gives ``Q``, ``L R`` is the rank-``r`` truncated SVD of the error ``E = W - Q``
  (``L = U_r sqrt(S_r)``, ``R = sqrt(S_r) V_r^T``), optionally with ``L`` and ``R`` quantized
  (the paper: int8);
- LQ-LoRA (Guo et al., 2024) alternating fit: repeat ``Q <- quant(W - L R)``,
  ``L R <- SVD_r(W - Q)``; ``quant`` rounds to nearest on the base layer's own grid (format,
  groups, symmetric or not). The Frobenius error ``||W - Q - L R||_F`` after each step is
  recorded; the fit stops at the first step that does not lower it and keeps the best;
- ``weighted=True`` (data-aware, as the SVD-based fits of ASVD / SVD-LLM weigh by the
  inputs): ``L R`` minimises ``||(W - Q - L R) X||_F`` on the layer's calibration inputs
  ``X`` instead of the weight-space error: with ``S = (H + d I)^{1/2}``, ``H = X^T X / N``
  the input Gram and ``d = damp * mean(diag H)``, ``L R = SVD_r((W - Q) S) S^{-1}``
  (:func:`weighted_svd_factors`); errors are then ``||(W - Q - L R) S||_F``. It needs the
  Grams of the block-by-block LLM pipeline (an LLM method as ``base``).

:class:`LowRankCompensationConfig` composes with any weight-only config: ``base`` runs as
it would alone (``GPTQConfig(bits=3, group_size=64)`` block by block, ``WeightOnlyConfig``
...), and each Linear it quantized becomes a :class:`~qkern.nn.CompensatedLinear`. Inside
the LLM pipeline the compensation is fitted as each layer is built (against the weight the
method quantized: after AWQ's scaling or a rotation, the transformed one), so later blocks
calibrate on compensated outputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ...nn import CompensatedLinear, LowRankLinear, QuantLinear
from ..calibration import run_batches
from ..registry import (
    BaseConfig,
    Quantizer,
    check_format,
    check_group,
    check_int,
    config_class,
    fail,
    quantizer_for,
    register_quantizer,
    replace_module,
)
from ..sequential import SequentialQuantizer, quantize_sequential
from .rtn import RTNConfig

__all__ = ["CompensationResult", "LowRankCompensationConfig", "LowRankCompensationQuantizer",
           "compensate", "compensate_model", "requantize", "svd_factors",
           "weighted_svd_factors"]


def svd_factors(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)``, ``L = U_r sqrt(S_r)`` (out, r) and ``R = sqrt(S_r) V_r^T`` (r, in): the
    best rank-``rank`` approximation ``L R`` of ``m`` (Eckart-Young), computed in float64."""
    if not isinstance(m, torch.Tensor) or m.dim() != 2:
        raise ValueError("svd_factors: m must be a 2-D tensor")
    check_int("svd_factors", "rank", rank, 1)
    if rank > min(m.shape):
        raise ValueError(f"svd_factors: rank {rank} exceeds min{tuple(m.shape)}")
    u, s, vh = torch.linalg.svd(m.detach().double(), full_matrices=False)
    r = s[:rank].sqrt()
    return (u[:, :rank] * r).float(), (r[:, None] * vh[:rank]).float()


def _gram_root(gram: torch.Tensor, k: int, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S^{-1})``, ``S = (gram + damp * mean(diag gram) I)^{1/2}`` (symmetric), float64."""
    if not isinstance(gram, torch.Tensor) or tuple(gram.shape) != (k, k):
        raise ValueError(f"weighted fit: gram must be a ({k}, {k}) tensor (the input Gram), "
                         f"got {getattr(gram, 'shape', type(gram).__name__)}")
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not damp >= 0:
        raise ValueError(f"weighted fit: damp must be a number >= 0, got {damp!r}")
    h = gram.detach().double()
    h = (h + h.T) / 2
    h = h + damp * float(h.diagonal().mean()) * torch.eye(k, dtype=torch.float64)
    lam, v = torch.linalg.eigh(h)
    if not bool(torch.isfinite(lam).all()) or float(lam.min()) <= 0:
        raise ValueError("weighted fit: the damped input Gram is not positive definite "
                         "(no calibration inputs reached the layer, or damp=0 with too few)")
    return (v * lam.sqrt()) @ v.T, (v / lam.sqrt()) @ v.T


def weighted_svd_factors(m: torch.Tensor, gram: torch.Tensor, rank: int, damp: float = 0.01
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with ``L R`` the rank-``rank`` matrix closest to ``m`` (out, in) in the
    input-weighted norm ``||(m - L R) S||_F``, ``S = (gram + damp * mean(diag gram) I)^{1/2}``:
    with ``gram = X^T X / N`` it minimises ``||(m - L R) X^T||_F^2 / N + d ||m - L R||_F^2``.
    ``L R = SVD_r(m S) S^{-1}``, ``L = U_r sqrt(S_r)``; float64 inside."""
    if not isinstance(m, torch.Tensor) or m.dim() != 2:
        raise ValueError("weighted_svd_factors: m must be a 2-D tensor")
    check_int("weighted_svd_factors", "rank", rank, 1)
    if rank > min(m.shape):
        raise ValueError(f"weighted_svd_factors: rank {rank} exceeds min{tuple(m.shape)}")
    s_half, s_inv = _gram_root(gram, m.shape[1], damp)
    u, s, vh = torch.linalg.svd(m.detach().double() @ s_half, full_matrices=False)
    r = s[:rank].sqrt()
    return (u[:, :rank] * r).float(), ((r[:, None] * vh[:rank]) @ s_inv).float()


def requantize(layer: QuantLinear, weight: torch.Tensor) -> QuantLinear:
    """``weight`` rounded to nearest on ``layer``'s grid: its format, groups and symmetry."""
    q = layer.weight_q
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if layer.bias is not None:
            lin.bias.copy_(layer.bias)
    g = q.group_size if q.granularity == "group" else None
    return QuantLinear.from_float(lin, q.format.name, group_size=g,
                                  symmetric=q.zero_point is None, mode=layer.mode)


@dataclass
class CompensationResult:
    """What :func:`compensate` returns: the layer, and ``errors`` the Frobenius error
    ``||W - Q - L R||_F`` (weighted: ``||(W - Q - L R) S||_F``) after LoRC (first) and
    after each LQ-LoRA step tried (the layer is the one with the smallest)."""

    layer: CompensatedLinear
    errors: list[float]


def compensate(weight: torch.Tensor, layer: QuantLinear, rank: int, iters: int = 0,
               factor_fmt: str | None = None, factor_group_size: int | None = None,
               gram: torch.Tensor | None = None, damp: float = 0.01) -> CompensationResult:
    """LoRC on ``layer`` (a QuantLinear quantizing the float ``weight`` (out, in)), then up
    to ``iters`` LQ-LoRA steps (module docstring). ``factor_fmt``: None keeps ``L``, ``R``
    in float, else their format (e.g. ``"int8"``, grouped by ``factor_group_size`` along
    each factor's input dim). ``gram`` (in, in), the layer's input Gram ``X^T X / N``: the
    data-aware fit of :func:`weighted_svd_factors` (``damp``) instead of the plain SVD."""
    if not isinstance(layer, QuantLinear):
        raise TypeError(f"compensate: layer must be a QuantLinear, got {type(layer).__name__}")
    w = weight.detach().float()
    if tuple(w.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"compensate: weight is {tuple(w.shape)}, the layer "
                         f"{(layer.out_features, layer.in_features)}")
    check_int("compensate", "iters", iters, 0)
    s_half = None if gram is None else _gram_root(gram, w.shape[1], damp)[0]

    def side_of(q: QuantLinear) -> tuple[LowRankLinear, float]:
        e = w - q.dequantize_weight()
        left, right = svd_factors(e, rank) if gram is None else \
            weighted_svd_factors(e, gram, rank, damp)
        side = LowRankLinear.from_factors(left, right, fmt=factor_fmt,
                                          group_size=factor_group_size)
        d = e - side.dequantize_weight()
        err = float(torch.linalg.norm(d if s_half is None else d.double() @ s_half))
        return side, err

    side, err = side_of(layer)
    best, errors = (layer, side, err), [err]
    for _ in range(iters):
        q = requantize(layer, w - side.dequantize_weight())
        side, err = side_of(q)
        errors.append(err)
        if err >= best[2]:
            break
        best = (q, side, err)
    return CompensationResult(CompensatedLinear(best[0], best[1]), errors)


def compensate_model(quantized: nn.Module, float_model: nn.Module, rank: int, iters: int = 0,
                     factor_fmt: str | None = None, factor_group_size: int | None = None,
                     inplace: bool = False) -> tuple[nn.Module, dict[str, list[float]]]:
    """LoRC / LQ-LoRA after the fact: every QuantLinear of ``quantized`` whose name is an
    ``nn.Linear`` of the same shape in ``float_model`` (the model it was quantized from)
    gets the compensation of :func:`compensate` (``rank`` capped at the layer's smaller
    dim). Returns (the model, {layer name: errors}); a copy unless ``inplace``. Unlike
    :class:`LowRankCompensationConfig` inside the LLM pipeline, later layers were quantized
    on uncompensated inputs (ZeroQuant-V2's LoRC is this post-hoc form)."""
    if not isinstance(quantized, nn.Module) or not isinstance(float_model, nn.Module):
        raise TypeError("compensate_model: quantized and float_model must be nn.Modules")
    target = quantized if inplace else copy.deepcopy(quantized)
    floats = dict(float_model.named_modules())
    errors = {}
    for name, m in list(target.named_modules()):
        f = floats.get(name)
        if not isinstance(m, QuantLinear) or not isinstance(f, nn.Linear) or \
                tuple(f.weight.shape) != (m.out_features, m.in_features):
            continue
        r = min(rank, m.in_features, m.out_features)
        res = compensate(f.weight, m, r, iters, factor_fmt, factor_group_size)
        replace_module(target, name, res.layer)
        errors[name] = res.errors
    return target, errors


@config_class
@dataclass
class LowRankCompensationConfig(BaseConfig):
    """``base`` (a weight-only config), then a rank-``rank`` correction ``L R`` of each
    quantized Linear's error: LoRC, plus ``iters`` LQ-LoRA alternating steps; ``weighted``
    fits ``L R`` to the output error ``||(W - Q - L R) X||`` on the calibration inputs (the
    module docstring; needs an LLM method as ``base``, run block by block). ``factor_fmt``
    None keeps the factors float (counted at 16 bits per value by the reports), or a format
    for them; ``include`` / ``exclude`` / ``overrides`` (e.g. ``{"*.down_proj": {"rank":
    16}}``) pick the compensated layers among those ``base`` quantized.

    >>> import qkern, torch
    >>> from qkern.quantization import LowRankCompensationConfig, WeightOnlyConfig
    >>> m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    >>> cfg = LowRankCompensationConfig(base=WeightOnlyConfig(fmt="int4", group_size=32),
    ...                                 rank=4)
    >>> q = qkern.quantize_model(m, cfg)
    >>> type(q[0]).__name__, q[0].side.rank
    ('CompensatedLinear', 4)
    """

    base: BaseConfig = field(default_factory=lambda: RTNConfig(bits=3, group_size=64))
    rank: int = 8
    iters: int = 0
    factor_fmt: str | None = None
    factor_group_size: int | None = None
    weighted: bool = False

    #: an override given as a format name sets the factors' format
    FORMAT_FIELD: ClassVar[str] = "factor_fmt"

    def __post_init__(self) -> None:
        n = type(self).__name__
        if not isinstance(self.base, BaseConfig) or isinstance(self.base,
                                                               LowRankCompensationConfig):
            fail(n, "base", "a weight-only qkern config (RTNConfig, GPTQConfig, "
                 "WeightOnlyConfig, ...)", self.base)
        check_int(n, "rank", self.rank, 1)
        check_int(n, "iters", self.iters, 0)
        if self.factor_fmt is not None:
            check_format(n, "factor_fmt", self.factor_fmt)
        check_group(n, "factor_group_size", self.factor_group_size)
        if not isinstance(self.weighted, bool):
            fail(n, "weighted", "True or False", self.weighted)
        super().__post_init__()


@register_quantizer(LowRankCompensationConfig)
class LowRankCompensationQuantizer(Quantizer):
    """Runs the base config's quantizer, then compensates (module docstring).
    ``errors[name]``: the Frobenius errors of :class:`CompensationResult` per layer."""

    SUPPORTED = (nn.Linear,)

    def __init__(self, config: LowRankCompensationConfig):
        super().__init__(config)
        self.base = quantizer_for(config.base)
        self.errors: dict[str, list[float]] = {}
        self.report = []

    def needs_calibration(self) -> str | None:
        return self.base.needs_calibration()

    def records_inputs(self) -> bool:
        return isinstance(self.base, SequentialQuantizer) or self.base.records_inputs() or \
            self.base.needs_calibration() is not None

    def calibrated(self, model: nn.Module) -> bool:
        return bool(self.batches) or self.needs_calibration() is None

    def _fit(self, name: str, weight: torch.Tensor, layer: nn.Module,
             gram: torch.Tensor | None = None) -> nn.Module:
        cfg = dict(self.plan).get(name)
        if cfg is None or not isinstance(layer, QuantLinear):
            return layer  # not asked for, or the base left it float / built something else
        if cfg.weighted and gram is None:
            raise ValueError(f"LowRankCompensationConfig(weighted=True): no calibration inputs "
                             f"reached {name!r} (pass calibration data)")
        rank = min(cfg.rank, layer.in_features, layer.out_features)
        res = compensate(weight, layer, rank, cfg.iters, cfg.factor_fmt, cfg.factor_group_size,
                         gram if cfg.weighted else None)
        self.errors[name] = res.errors
        return res.layer

    def convert(self, model: nn.Module) -> None:
        base = self.base
        weighted = any(getattr(c, "weighted", False) for _, c in self.plan)
        if isinstance(base, SequentialQuantizer):
            inner, want = base.quantize_layer, base.wants_grams()

            def quantize_layer(name, linear, gram, cfg):
                w = linear.weight.detach().float().clone()
                # the base sees the Gram only if it asked for it (as without compensation)
                return self._fit(name, w, inner(name, linear, gram if want else None, cfg),
                                 gram)

            base.quantize_layer = quantize_layer  # this instance only
            if weighted:
                base.wants_grams = lambda: True  # float64 Grams of every layer's inputs
            quantize_sequential(model, base, self.batches or None, inplace=True)
            self.report = base.report
        else:
            if weighted:
                raise ValueError("LowRankCompensationConfig(weighted=True) needs the layers' "
                                 "input Grams of the block-by-block LLM pipeline: use an LLM "
                                 f"method as base (RTN, GPTQ, AWQ ...), not "
                                 f"{type(self.config.base).__name__}")
            base.prepare(model)  # may transform the float weights (equalization)
            floats = {n: model.get_submodule(n).weight.detach().float().clone()
                      for n, _ in self.plan}
            if base.records_inputs():
                base.batches = self.batches
            elif self.batches:
                run_batches(model, self.batches)  # the base's observers see the data
            base.convert(model)
            for name, w in floats.items():
                new = self._fit(name, w, model.get_submodule(name))
                replace_module(model, name, new)
        self.skipped.update(base.skipped)
