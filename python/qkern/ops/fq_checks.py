"""Argument checks of ``qkern::lsq_fake_quantize`` and its backward (ops/fake_quant.py), shared
by the fake (meta) kernels in ``schemas.py`` and the CPU kernels. Each raises ValueError or
TypeError naming the op and the problem."""

from __future__ import annotations

import math

import torch

from .checks import FLOAT_DTYPES, check_dtype, size_product

OP = "lsq_fake_quantize"
_INT32_MAX = 2**31 - 1


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                  axis: int | None, q_n: int, q_p: int, grad_factor: float
                  ) -> tuple[int, int, int]:
    """The kernel's ``(outer, C, inner)`` view of ``x``: x float32 / bfloat16 / float16 (the
    kernel computes in float32), scale (and offset) float32 with one value (axis None) or
    ``x.shape[axis]`` values (any shape: the gradients come back in it), ``0 <= q_n``,
    ``0 < q_p`` (both < 2^31), grad_factor finite."""
    check_dtype(OP, x, "x", FLOAT_DTYPES)
    check_dtype(OP, scale, "scale", (torch.float32,))
    check_dtype(OP, offset, "offset", (torch.float32,))
    if not 0 <= q_n <= _INT32_MAX:
        raise ValueError(f"{OP}: q_n must be in [0, 2^31), got {q_n}")
    if not 0 < q_p <= _INT32_MAX:
        raise ValueError(f"{OP}: q_p must be in [1, 2^31), got {q_p}")
    if not math.isfinite(grad_factor):
        raise ValueError(f"{OP}: grad_factor must be finite, got {grad_factor}")
    if axis is None:
        outer, c, inner = 1, 1, x.numel()
        if scale.numel() != 1:
            raise ValueError(f"{OP}: per-tensor (axis=None) needs one scale, got "
                             f"{scale.numel()}")
    else:
        if not -x.dim() <= axis < max(x.dim(), 1) or x.dim() == 0:
            raise ValueError(f"{OP}: axis {axis} is out of range for x of shape "
                             f"{tuple(x.shape)}")
        a = axis % x.dim()
        outer, c = math.prod(x.shape[:a]), x.shape[a]
        inner = math.prod(x.shape[a + 1:])
        if scale.numel() != c:
            raise ValueError(f"{OP}: scale has {scale.numel()} elements, expected "
                             f"x.shape[{axis}] = {c} (one per channel)")
    if offset is not None and offset.numel() != scale.numel():
        raise ValueError(f"{OP}: offset has {offset.numel()} elements, expected one per scale "
                         f"({scale.numel()})")
    size_product(OP, outer, c, inner)
    return outer, c, inner


def backward(grad: torch.Tensor, x: torch.Tensor) -> None:
    """grad_y: x's shape, a float dtype."""
    check_dtype(OP, grad, "grad", FLOAT_DTYPES)
    if grad.shape != x.shape:
        raise ValueError(f"{OP}: grad has shape {tuple(grad.shape)}, expected x's "
                         f"{tuple(x.shape)}")
