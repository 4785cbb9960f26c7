"""References for the group-wise weight matmuls (gemm_w4, gemm_w23), written from
docs/numerics.md: float64 products of the dequantized weights, the fast modes' activation
quantization in numpy float32, and the stated error bounds of the exact and fast modes."""

from __future__ import annotations

import numpy as np
import torch

U = 2.0 ** -24  # float32 unit roundoff


def dequant64(q, s, z, group):
    zz = 0 if z is None else z.double().repeat_interleave(group, 1)
    return (q.double() - zz) * s.double().repeat_interleave(group, 1)


def ref_exact(x, q, s, z, group, bias=None):
    y = x.double() @ dequant64(q, s, z, group).T
    return y if bias is None else y + bias.double()


def quantize_x_ref(x: torch.Tensor):
    """The fast mode's activation quantization, in numpy float32: per block of 32,
    d = amax / 127, xq = clip(rint(x * (1 / d)), -127, 127); d < FLT_MIN -> d = 0, xq = 0."""
    xb = x.numpy().astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(axis=2)
    d = (amax / np.float32(127)).astype(np.float32)
    tiny = d < np.finfo(np.float32).tiny
    r = (np.float32(1) / np.where(tiny, np.float32(1), d)).astype(np.float32)
    xq = np.clip(np.rint(xb * r[:, :, None]), -127, 127)
    xq[tiny] = 0
    d[tiny] = 0
    return torch.from_numpy(xq.reshape(x.shape).astype(np.float64)), torch.from_numpy(d)


def check_exact(y, x, q, s, z, group, bias=None):
    k = x.shape[-1]  # chains of G FMAs per group, K/G per output, the bias add
    ref = ref_exact(x, q, s, z, group, bias)
    mag = x.double().abs() @ dequant64(q, s, z, group).abs().T
    if bias is not None:
        mag = mag + bias.double().abs()
    bound = (group + k // group + 2) * 1.01 * U * mag + 1e-300
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


def check_fast(y, x, q, s, z, group, bias=None):
    xq, d = quantize_x_ref(x)
    xd = xq * d.repeat_interleave(32, 1)  # the quantized activations, exactly
    w = dequant64(q, s, z, group)
    yq = xd @ w.T + (0 if bias is None else bias.double())
    # float32 accumulation: G/32 FMAs per group, K/G per output, the bias add
    nacc = group // 32 + x.shape[-1] // group + 2
    mag = xd.abs() @ w.abs().T + (0 if bias is None else bias.double().abs())
    err = (y.double() - yq).abs()
    bound = nacc * 1.01 * U * mag + 1e-300
    assert bool((err <= bound).all()), float((err / bound).max())
    # against the true product: |x - d xq| <= d / 2 + 2.0001 u |x| per element
    xerr = d.repeat_interleave(32, 1) / 2 + 2.0001 * U * x.double().abs()
    total = xerr @ w.abs().T + bound
    assert bool(((y.double() - ref_exact(x, q, s, z, group, bias)).abs() <= total).all())
