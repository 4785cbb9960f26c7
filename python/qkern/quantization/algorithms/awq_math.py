"""AWQ's math on tensors (:mod:`~qkern.quantization.algorithms.awq` runs it per block): the
round to nearest of the scale search and of the clip search, the scales of one alpha grid,
duo scaling's weight mean, and llm-awq's auto_clip on one layer."""

from __future__ import annotations

import torch

from ...quantize import fake_quantize
from ..constraints import HardwareConstraints, constrained_fake_weight

__all__ = ["CHUNK", "awq_scales", "clip_quantize", "clip_ratios", "clip_search",
           "pseudo_quantize", "weight_mean"]

#: elements per chunk of batched candidate weights (bounds the searches' extra memory)
CHUNK = 1 << 24


def pseudo_quantize(w: torch.Tensor, bits: int, group_size: int | None, sym: bool,
                    c: HardwareConstraints | None = None) -> torch.Tensor:
    """Round to nearest of ``w`` (rows, K) on qkern's ``int{bits}`` grid, dequantized: per
    row (``group_size`` None) or in groups along K, as ``QuantLinear.from_float`` does; under
    hardware constraints ``c`` on the grid the final layer gets
    (``constraints.constrained_fake_weight``)."""
    fmt = f"int{bits}"
    if c is not None and c.touches_weights():
        return constrained_fake_weight(w, fmt, c, sym, group_size).to(w.dtype)
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
    rows = max(1, CHUNK // (len(ratios) * k))
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
