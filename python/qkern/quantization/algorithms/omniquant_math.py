"""OmniQuant's tensor math (:mod:`~qkern.quantization.algorithms.omniquant` trains with it
per block): learnable weight clipping's range, scales / zero points and fake quantization on
qkern's ``int{bits}`` grid, the clipped weight, and the per-token int8 activations of W8A8."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ... import formats as QF

__all__ = ["MIN_SCALE", "act_fake_quant", "clip_weight", "fake_quant_inputs", "lwc_fake_quant",
           "lwc_qparams", "lwc_range", "round_ste"]

#: smallest scale (as qkern's quantize: a zero range takes scale 1, smaller ones FLT_MIN)
MIN_SCALE = float(torch.finfo(torch.float32).tiny)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _grid(bits: int) -> tuple[int, int]:
    f = QF.get(f"int{bits}")
    return f.qmin, f.qmax


def _sane(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale)).clamp_min(MIN_SCALE)


def lwc_range(w: torch.Tensor, group: int, up: torch.Tensor | None = None,
              low: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group ``(max(sigmoid(up) max(w_g), 0), min(sigmoid(low) min(w_g), 0))``."""
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    hi, lo = wg.amax(-1), wg.amin(-1)
    if up is not None:
        hi = torch.sigmoid(up) * hi
    if low is not None:
        lo = torch.sigmoid(low) * lo
    return hi.clamp_min(0.0), lo.clamp_max(0.0)


def lwc_qparams(w: torch.Tensor, group: int, bits: int, sym: bool,
                up: torch.Tensor | None = None, low: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points (N, K / group) of ``w`` (N, K) on qkern's ``int{bits}`` grid
    with the learnable clip: ``hi = max(sigmoid(up) max(w_g), 0)``, ``lo = min(sigmoid(low)
    min(w_g), 0)`` per group (``up`` / ``low`` None: no clipping, qkern's min-max rule).
    Asymmetric: ``scale = (hi - lo) / (qmax - qmin)``, ``zp = clamp(qmin - rne(lo / scale))``
    (no gradient through the zero point, as the authors' ``round``); symmetric:
    ``scale = max(hi, -lo) / qmax``, zp None. Differentiable in ``up`` / ``low``."""
    hi, lo = lwc_range(w, group, up, low)
    qmin, qmax = _grid(bits)
    if sym:
        return _sane(torch.maximum(hi, -lo) / float(qmax)), None
    scale = _sane((hi - lo) / float(qmax - qmin))
    zp = (qmin - torch.round(lo.detach() / scale.detach())).clamp(qmin, qmax)
    return scale, zp


def lwc_fake_quant(w: torch.Tensor, group: int, bits: int, sym: bool,
                   up: torch.Tensor | None = None, low: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(w_q, scale, zp)``: ``w`` quantized and dequantized on qkern's grid with the clip of
    :func:`lwc_qparams`, rounding through :func:`round_ste` (float32, the kernels' order of
    operations: ``t = w * (1/scale)``, ``q = clamp(rne(t) + zp, qmin, qmax)``,
    ``w_q = (q - zp) * scale``)."""
    n, k = w.shape
    scale, zp = lwc_qparams(w, group, bits, sym, up, low)
    qmin, qmax = _grid(bits)
    s = scale.unsqueeze(-1)
    t = w.reshape(n, k // group, group) * (1.0 / s)
    q = round_ste(t)
    if zp is not None:
        q = q + zp.unsqueeze(-1)
    q = q.clamp(qmin, qmax)
    if zp is not None:
        q = q - zp.unsqueeze(-1)
    return (q * s).reshape(n, k), scale, zp


def clip_weight(w: torch.Tensor, group: int, sym: bool, up: torch.Tensor | None,
          low: torch.Tensor | None) -> torch.Tensor:
    """``w`` (N, K) with each group clamped to its learned ``[lo, hi]`` (:func:`lwc_range`;
    sym: ``+-max(hi, -lo)``), float32, no gradient."""
    with torch.no_grad():
        w = w.detach().float()
        hi, lo = lwc_range(w, group, up, low)
        if sym:
            hi = torch.maximum(hi, -lo)
            lo = -hi
        n, k = w.shape
        wg = torch.minimum(torch.maximum(w.reshape(n, k // group, group), lo.unsqueeze(-1)),
                           hi.unsqueeze(-1))
        return wg.reshape(n, k)


def act_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 of the w8a8 kernel (docs/numerics.md: ``sx = amax / 127``,
    0 -> 1, ``xq = clamp(rne(x / sx), -127, 127)``), straight-through rounding."""
    sx = x.abs().amax(-1, keepdim=True) / 127.0
    sx = torch.where(sx > 0, sx, torch.ones_like(sx)).clamp_min(MIN_SCALE)
    return round_ste(x * (1.0 / sx)).clamp(-127, 127) * sx


@contextlib.contextmanager
def fake_quant_inputs(block: nn.Module, names):
    """While active, the named linears of ``block`` see per-token int8 fake-quantized inputs."""
    hooks = [block.get_submodule(n).register_forward_pre_hook(
        lambda mod, args: (act_fake_quant(args[0]), *args[1:])) for n in names]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
