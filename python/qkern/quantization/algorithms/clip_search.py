"""Clip search on the output error ("ghost clipping"): each weight's clip ratio chosen from a
grid to minimise the layer's output error on its calibration inputs, sum over rows
``(w - w_q) H (w - w_q)^T`` with ``H = X^T X``, instead of the weight MSE.
``clip_search="output"`` on WeightOnlyConfig / StaticConfig / AdaRoundConfig runs it, and
:func:`weight_params` turns a config's clip search / per-tensor options into the scales
:func:`~qkern.quantization.layers.weight_module` builds a layer with."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ... import formats as QF
from ...observers import make_observer
from ...quantize import quantize
from ..registry import check_choice, fail

__all__ = ["CLIP_GRID", "CLIP_SEARCHES", "WEIGHT_OBSERVERS", "check_weight_observer",
           "clip_searchable", "output_clip_search", "weight_params"]

#: clip ratios the output clip search tries (1 = the data range)
CLIP_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(25))  # 1.0 ... 0.4
#: the values of a config's ``clip_search`` field
CLIP_SEARCHES = ("none", "output")
#: the values of StaticConfig's ``weight_observer``: per-output-channel weight ranges from
#: an observer ("minmax": the data range, qkern.quantize's own)
WEIGHT_OBSERVERS = ("minmax", "mse", "percentile", "histogram", "kl")


def _weight_observer(cfg):
    return make_observer(cfg.weight_observer, fmt=cfg.fmt, symmetric=cfg.symmetric,
                         granularity="channel", axis=0)


def check_weight_observer(cfg) -> None:
    """``cfg.weight_observer``: one of WEIGHT_OBSERVERS; other than "minmax" only for per
    output channel weights (no group_size / per_tensor / clip_search) in a format the observer
    takes (histogram: integer formats; kl: symmetric integer formats)."""
    n, name = type(cfg).__name__, cfg.weight_observer
    check_choice(n, "weight_observer", name, WEIGHT_OBSERVERS)
    if name == "minmax":
        return
    if cfg.group_size is not None or cfg.per_tensor or cfg.clip_search != "none":
        fail(n, "weight_observer", "'minmax' with group_size, per_tensor or clip_search "
             "(an observer sets one range per output channel)", name)
    try:
        _weight_observer(cfg)
    except ValueError as e:
        fail(n, "weight_observer", f"an observer for fmt={cfg.fmt!r}, "
             f"symmetric={cfg.symmetric} ({e})", name)


def clip_searchable(fmt: str) -> bool:
    """Formats whose data-derived scale can be shrunk (integer grids and absmax codebooks;
    not MX's power-of-two scales or the mean-|x| scales of ternary / binary)."""
    f = QF.get(fmt)
    return f.kind in ("int", "codebook") and f.scale_rule in (QF.SCALE_ABSMAX, QF.SCALE_MINMAX)


def output_clip_search(w: torch.Tensor, gram: torch.Tensor, fmt: str, *,
                       group_size: int | None = None, symmetric: bool = True,
                       per_tensor: bool = False, grid: Sequence[float] = CLIP_GRID,
                       cross: torch.Tensor | None = None,
                       **quant_kwargs) -> tuple[dict, torch.Tensor]:
    """Scales (and zero points) for weight ``w`` (out, K) with clip ratios from ``grid`` that
    minimise the output error ``(w - w_q) H (w - w_q)^T`` summed over rows, ``H = gram``
    (K, K) the layer's input second moment. Rows are independent in that error, so each
    output row takes its own ratio (one ratio for the layer when ``per_tensor``).

    With ``cross`` (``E[x^ x^T]``, x^ the input the quantized layer sees and x the float
    model's, ``gram`` then being ``E[x^ x^^T]``) the error is ``E||w x - w_q x^||^2`` up to
    a constant: ``w_q H w_q^T - 2 w_q cross w^T``, so the scales may also make up for error
    made upstream (progressive calibration).

    Returns (keyword arguments ``scale`` / ``zero_point`` for ``qkern.quantize`` in the
    layout of ``group_size`` (None: per output channel), the ratio chosen per row)."""
    w = w.detach().float()
    if per_tensor:
        gran = {"granularity": "tensor"}
    elif group_size is None:
        gran = {"granularity": "channel", "axis": 0}
    else:
        gran = {"granularity": "group", "axis": 1, "group_size": group_size}
    h = gram.to(torch.float64)
    errs, cands = [], []
    for r in grid:
        q = quantize(w, fmt, symmetric=symmetric, clip_ratio=None if r == 1.0 else r,
                     **gran, **quant_kwargs)
        if cross is None:
            d = (w - q.dequantize()).double()
            errs.append(((d @ h) * d).sum(1))
        else:
            wq = q.dequantize().double()
            errs.append(((wq @ h) * wq).sum(1) - 2 * ((wq @ cross.double()) * w.double()).sum(1))
        cands.append(q)
    err = torch.stack(errs)  # (grid, out)
    if per_tensor:
        best = int(err.sum(1).argmin())
        q = cands[best]
        return ({"scale": q.scale, "zero_point": q.zero_point},
                torch.full((w.shape[0],), float(grid[best])))
    pick = err.argmin(0)  # (out,)
    rows = torch.arange(w.shape[0])
    scale = torch.stack([c.scale for c in cands])[pick, rows]
    zp = None
    if cands[0].zero_point is not None:
        zp = torch.stack([c.zero_point for c in cands])[pick, rows]
    ratios = torch.tensor([float(grid[i]) for i in pick.tolist()])
    return {"scale": scale, "zero_point": zp}, ratios


def weight_params(cfg, gram: torch.Tensor | None, notes: dict, name: str,
                  cross: torch.Tensor | None = None):
    """The ``params`` function of ``layers.weight_module`` for a layer config: scales
    from the output clip search (with a Gram matrix, and ``cross`` for the progressive
    objective) and / or one per-tensor scale, or per-channel scales from the config's
    ``weight_observer``; None when the config asks for none of these."""
    if getattr(cfg, "weight_observer", "minmax") != "minmax":
        def observed(w: torch.Tensor, group: int | None) -> dict:
            obs = _weight_observer(cfg)
            obs(w)
            scale, zp = obs.calculate_qparams()
            return {"scale": scale, "zero_point": zp}

        return observed
    per_tensor = getattr(cfg, "per_tensor", False)
    search = getattr(cfg, "clip_search", "none") == "output" and gram is not None
    if search and not clip_searchable(cfg.fmt):
        notes[name] = f"clip_search='output' does not apply to {cfg.fmt}: data range kept"
        search = False
    if not (per_tensor or search):
        return None
    extra = {"rounding": cfg.rounding} if hasattr(cfg, "rounding") else {}

    def params(w: torch.Tensor, group: int | None) -> dict:
        if search:
            kw, _ = output_clip_search(w, gram, cfg.fmt, group_size=group,
                                       symmetric=cfg.symmetric, per_tensor=per_tensor,
                                       cross=cross, **extra)
        else:
            q = quantize(w, cfg.fmt, granularity="tensor", symmetric=cfg.symmetric)
            kw = {"scale": q.scale, "zero_point": q.zero_point}
        if per_tensor:  # one scale, stored as the same scale for every output channel
            zp = kw["zero_point"]
            kw = {"scale": kw["scale"].reshape(()).expand(w.shape[0]).clone(),
                  "zero_point": None if zp is None else zp.reshape(()).expand(w.shape[0])
                  .clone()}
        return kw

    return params
