"""``qkern::lsq_fake_quantize``: LSQ / LSQ+ fake quantization with a learned step size,
fused forward and backward (csrc/cpu/fakequant/api.h; the per-element rule is
csrc/core/fakequant.h):

    y = round(clamp((x - offset) * (1 / scale), -q_n, q_p)) * scale + offset

round half to even, ``1 / scale`` one float32 division per scale. ``axis=None``: one scale
(per tensor); ``axis=a``: ``scale`` 1-d with ``x.shape[a]`` values (per channel); group-wise:
pass ``x`` viewed as ``(rows * groups, group_size)`` with ``axis=0``. ``offset`` (LSQ+'s
beta) has scale's shape, or is None. ``x`` is float32, bfloat16 or float16 (computed in
float32; y and grad_x in x's dtype); ``scale`` and ``offset`` are float32, scale > 0 and
finite.

Autograd (``qkern::lsq_fake_quantize_backward``, one pass over x and grad, nothing saved but
the inputs), with the straight-through estimator for round and ``g = grad_factor`` (LSQ:
``1 / sqrt(N * q_p)``, N elements per scale); t = (x - offset) / scale, inside =
-q_n <= t <= q_p (bounds included, as torch.clamp's gradient):

    grad_x      = grad  inside, 0 outside
    grad_scale  = g * sum(grad * (round(t) - t inside, -q_n below, q_p above))
    grad_offset = g * sum(grad outside)

summed in double in an order fixed by the shape (the same for every thread count and ISA).
"""

from __future__ import annotations

import torch

from .. import _C
from . import fq_checks
from .raw import contig, ptr
from .schemas import LIB

__all__ = ["lsq_fake_quantize_backward_cpu", "lsq_fake_quantize_cpu"]


def lsq_fake_quantize_cpu(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                          axis: int | None, q_n: int, q_p: int, grad_factor: float
                          ) -> torch.Tensor:
    outer, c, inner = fq_checks.fake_quantize(x, scale, offset, axis, q_n, q_p, grad_factor)
    xf = contig(x, torch.float32)
    y = torch.empty(x.shape, dtype=torch.float32)
    if y.numel():
        _C.fake_quantize_raw(ptr(xf), ptr(contig(scale, torch.float32)),
                             ptr(contig(offset, torch.float32)), outer, c, inner, q_n, q_p,
                             ptr(y))
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def lsq_fake_quantize_backward_cpu(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                                   offset: torch.Tensor | None, axis: int | None, q_n: int,
                                   q_p: int, grad_factor: float
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    outer, c, inner = fq_checks.fake_quantize(x, scale, offset, axis, q_n, q_p, grad_factor)
    fq_checks.backward(grad, x)
    xf, gf = contig(x, torch.float32), contig(grad, torch.float32)
    gx = torch.empty(x.shape, dtype=torch.float32)
    gs = torch.zeros(c, dtype=torch.float32)
    gb = torch.zeros(c if offset is not None else 0, dtype=torch.float32)
    if x.numel():  # else nothing to sum: zero gradients
        _C.fake_quantize_backward_raw(ptr(xf), ptr(gf), ptr(contig(scale, torch.float32)),
                                      ptr(contig(offset, torch.float32)), outer, c, inner,
                                      q_n, q_p, float(grad_factor), ptr(gx), gs.data_ptr(),
                                      ptr(gb))
    gx = gx if x.dtype == torch.float32 else gx.to(x.dtype)
    return gx, gs.reshape(scale.shape), gb.reshape(offset.shape if offset is not None else (0,))


def _setup_context(ctx, inputs, output) -> None:
    x, scale, offset, *args = inputs
    ctx.save_for_backward(x, scale, offset)
    ctx.args = args


def _backward(ctx, grad: torch.Tensor):
    x, scale, offset = ctx.saved_tensors
    gx, gs, gb = torch.ops.qkern.lsq_fake_quantize_backward(grad, x, scale, offset, *ctx.args)
    return gx, gs, (gb if offset is not None else None), None, None, None, None


LIB.impl("lsq_fake_quantize", lsq_fake_quantize_cpu, "CPU")
LIB.impl("lsq_fake_quantize_backward", lsq_fake_quantize_backward_cpu, "CPU")
torch.library.register_autograd("qkern::lsq_fake_quantize", _backward,
                                setup_context=_setup_context)
