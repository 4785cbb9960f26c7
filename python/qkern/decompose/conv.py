"""Tensor decompositions of Conv2d kernels (O, I, kh, kw), then quantization of the factors.

- Tucker-2 (Kim et al., 2016): ``K ~ G x_0 U_out x_1 U_in`` with ``G`` (r_out, r_in, kh, kw),
  ``U_out`` (O, r_out), ``U_in`` (I, r_in), from the HOSVD (leading left singular vectors of
  the mode-0 and mode-1 unfoldings) refined by ``als_iters`` HOOI (ALS) sweeps; the conv
  becomes a 1x1 conv (I -> r_in), the kh x kw conv with the core (r_in -> r_out, the original
  stride / padding / dilation) and a 1x1 conv (r_out -> O, the bias);
- CP (Lebedev et al., 2015): ``K[o,i,y,x] ~ sum_r A_o[o,r] A_i[i,r] A_y[y,r] A_x[x,r]`` by
  alternating least squares (each factor in turn the least-squares solution with the others
  fixed: ``A_n = X_(n) KR(others) (Hadamard of the others' Gram matrices)^+``); the conv
  becomes a 1x1 conv (I -> R), a depthwise kh x 1 conv, a depthwise 1 x kw conv and a 1x1
  conv (R -> O, the bias). Both sequences equal the conv with the reconstructed kernel, zero
  padding included (a projection of zeros is zero; the CP kernel is separable).

:func:`quantize_factors` then quantizes each conv of a sequence: the dense ones (1x1 and the
Tucker core) become :class:`~qkern.nn.QuantConv2d` through the workflow's ``weight_module``;
the depthwise CP convs, which qkern's kernels do not run, keep a float weight holding the
dequantized values of :func:`qkern.quantize` (per output channel), tagged
``fake_quant_bits`` so :func:`storage_bits` counts them at the format's width.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import formats as QF
from ..nn import QuantConv1d, QuantConv2d, QuantLinear, weight_bits
from ..quantization.layers import weight_module
from ..quantization.registry import check_int
from ..quantize import quantize

__all__ = ["cp_als", "cp_conv", "cp_reconstruct", "decompose_convs", "quantize_factors",
           "storage_bits", "tucker2", "tucker2_reconstruct", "tucker_conv"]


def _kernel(k) -> torch.Tensor:
    if not isinstance(k, torch.Tensor) or k.dim() != 4 or not k.is_floating_point():
        raise ValueError("the kernel must be a 4-D float (out, in, kh, kw) tensor")
    if not bool(torch.isfinite(k).all()):
        raise ValueError("the kernel contains NaN or Inf")
    return k.detach().double()


def _leading(m: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.svd(m, full_matrices=False)[0][:, :r]


def tucker2(kernel: torch.Tensor, ranks: tuple[int, int], als_iters: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(core, U_out, U_in)`` of the Tucker-2 decomposition of ``kernel`` (module
    docstring) at ``ranks = (r_out, r_in)``; float32, computed in float64."""
    k = _kernel(kernel)
    o, i = k.shape[:2]
    if not (isinstance(ranks, (tuple, list)) and len(ranks) == 2):
        raise ValueError(f"ranks must be (r_out, r_in), got {ranks!r}")
    ro, ri = ranks
    check_int("tucker2", "r_out", ro, 1)
    check_int("tucker2", "r_in", ri, 1)
    if ro > o or ri > i:
        raise ValueError(f"ranks {tuple(ranks)} exceed the kernel's channels ({o}, {i})")
    check_int("tucker2", "als_iters", als_iters, 0)
    u_out = _leading(k.reshape(o, -1), ro)
    u_in = _leading(k.transpose(0, 1).reshape(i, -1), ri)
    for _ in range(als_iters):  # HOOI: each factor from the kernel projected on the other
        u_out = _leading(torch.einsum("oihw,ib->obhw", k, u_in).reshape(o, -1), ro)
        u_in = _leading(torch.einsum("oihw,oa->iahw", k, u_out).reshape(i, -1), ri)
    core = torch.einsum("oihw,oa,ib->abhw", k, u_out, u_in)
    return core.float(), u_out.float(), u_in.float()


def tucker2_reconstruct(core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor
                        ) -> torch.Tensor:
    """The kernel ``core x_0 U_out x_1 U_in`` (O, I, kh, kw)."""
    return torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)


_MODES = "oiyx"


def cp_als(kernel: torch.Tensor, rank: int, iters: int = 200, tol: float = 1e-10,
           seed: int = 0) -> list[torch.Tensor]:
    """``[A_o, A_i, A_y, A_x]`` (each (dim, rank)) of a rank-``rank`` CP decomposition of
    ``kernel`` by ALS (module docstring), from a seeded random start; stops after ``iters``
    sweeps or when the relative fit changes by less than ``tol``. Float32, computed in
    float64; the factors' scale sits in ``A_o``."""
    k = _kernel(kernel)
    check_int("cp_als", "rank", rank, 1)
    check_int("cp_als", "iters", iters, 1)
    g = torch.Generator().manual_seed(seed)
    fac = [torch.randn(d, rank, generator=g, dtype=torch.float64) for d in k.shape]
    norm = float(torch.linalg.norm(k))
    prev = None
    for _ in range(iters):
        for n in range(4):
            others = [m for m in range(4) if m != n]
            spec = (f"{_MODES},"
                    + ",".join(f"{_MODES[m]}r" for m in others) + f"->{_MODES[n]}r")
            mttkrp = torch.einsum(spec, k, *[fac[m] for m in others])
            v = torch.ones(rank, rank, dtype=torch.float64)
            for m in others:
                v = v * (fac[m].T @ fac[m])
            fac[n] = mttkrp @ torch.linalg.pinv(v)
            if n != 0:  # keep the scale in A_o (unit-norm columns elsewhere)
                s = torch.linalg.norm(fac[n], dim=0).clamp_min(1e-30)
                fac[n] = fac[n] / s
                fac[0] = fac[0] * s
        err = float(torch.linalg.norm(k - cp_reconstruct(fac))) / max(norm, 1e-30)
        if prev is not None and abs(prev - err) < tol:
            break
        prev = err
    return [f.float() for f in fac]


def cp_reconstruct(factors: list[torch.Tensor]) -> torch.Tensor:
    """The kernel ``sum_r A_o[:, r] o A_i[:, r] o A_y[:, r] o A_x[:, r]``."""
    return torch.einsum("or,ir,yr,xr->oiyx", *factors)


def _check_conv(conv) -> nn.Conv2d:
    if type(conv) is not nn.Conv2d:
        raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"grouped convolution (groups={conv.groups}) is not supported")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"padding {conv.padding!r} / mode {conv.padding_mode!r} is not "
                         "supported (numeric zero padding only)")
    return conv


def _conv(w: torch.Tensor, bias=None, **kw) -> nn.Conv2d:
    o, i, kh, kw_ = w.shape
    groups = kw.get("groups", 1)
    c = nn.Conv2d(i * groups, o, (kh, kw_), bias=bias is not None, **kw)
    with torch.no_grad():
        c.weight.copy_(w)
        if bias is not None:
            c.bias.copy_(bias)
    return c


def tucker_conv(conv: nn.Conv2d, ranks: tuple[int, int], als_iters: int = 0
                ) -> nn.Sequential:
    """``conv`` as 1x1 (I -> r_in), kh x kw core (r_in -> r_out), 1x1 (r_out -> O) convs.

    >>> import torch
    >>> from qkern.decompose import tucker_conv
    >>> c = torch.nn.Conv2d(16, 32, 3, padding=1)
    >>> seq = tucker_conv(c, (32, 16))          # full ranks: exact
    >>> x = torch.randn(2, 16, 8, 8)
    >>> bool(torch.allclose(seq(x), c(x), atol=1e-4))
    True
    """
    c = _check_conv(conv)
    core, u_out, u_in = tucker2(c.weight, ranks, als_iters)
    return nn.Sequential(
        _conv(u_in.T[:, :, None, None]),
        _conv(core, stride=c.stride, padding=c.padding, dilation=c.dilation),
        _conv(u_out[:, :, None, None], c.bias))


def cp_conv(conv: nn.Conv2d, rank: int, iters: int = 200, seed: int = 0) -> nn.Sequential:
    """``conv`` as 1x1 (I -> R), depthwise kh x 1, depthwise 1 x kw, 1x1 (R -> O) convs
    (Lebedev et al.)."""
    c = _check_conv(conv)
    a_o, a_i, a_y, a_x = cp_als(c.weight, rank, iters, seed=seed)
    (sh, sw), (ph, pw), (dh, dw) = c.stride, c.padding, c.dilation
    return nn.Sequential(
        _conv(a_i.T[:, :, None, None]),
        _conv(a_y.T[:, None, :, None], stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
              groups=rank),
        _conv(a_x.T[:, None, None, :], stride=(1, sw), padding=(0, pw), dilation=(1, dw),
              groups=rank),
        _conv(a_o[:, :, None, None], c.bias))


def quantize_factors(seq: nn.Sequential, fmt: str, group_size: int | None = None,
                     symmetric: bool = True) -> nn.Sequential:
    """A copy of a :func:`tucker_conv` / :func:`cp_conv` sequence with every conv's weight in
    ``fmt`` (module docstring); ``group_size`` along each conv's input (I * kh * kw), per
    output channel when None or when it does not divide it."""
    QF.get(fmt)
    out, notes = copy.deepcopy(seq), {}
    for idx, c in enumerate(out):
        if c.groups == 1:
            out[idx] = weight_module(c, fmt, group_size, notes, str(idx), symmetric=symmetric)
        else:
            q = quantize(c.weight.detach().reshape(c.out_channels, -1), fmt,
                         granularity="channel", axis=0, symmetric=symmetric)
            with torch.no_grad():
                c.weight.copy_(q.dequantize().reshape(c.weight.shape))
            c.fake_quant_bits = QF.get(fmt).bits
            c.fake_quant_zero = q.zero_point is not None
    return out


def storage_bits(model: nn.Module, float_bits: int = 32) -> int:
    """Bits of the weights of ``model``: :func:`qkern.nn.weight_bits` (float layers at
    ``float_bits``), depthwise convs of :func:`quantize_factors` at their format's width plus a
    16-bit scale (and zero point) per channel."""
    b = getattr(model, "fake_quant_bits", None)
    if b is not None:
        extra = 16 + (b if model.fake_quant_zero else 0)
        return model.weight.numel() * b + model.out_channels * extra
    if isinstance(model, (QuantLinear, QuantConv1d, QuantConv2d, nn.Linear, nn.Conv1d,
                          nn.Conv2d)):
        return weight_bits(model, float_bits)
    return sum(storage_bits(c, float_bits) for c in model.children())


def decompose_convs(model: nn.Module, method: str, rank, fmt: str | None = None,
                    layers: list[str] | None = None, als_iters: int = 0,
                    group_size: int | None = None) -> nn.Module:
    """A copy of ``model`` with its Conv2d layers (``layers``: their names; None: every
    groups=1 Conv2d) replaced by :func:`tucker_conv` (``method="tucker"``, ``rank`` an
    (r_out, r_in) pair, each capped at the layer's channels) or :func:`cp_conv`
    (``method="cp"``, ``rank`` an int; ``als_iters`` its sweeps, 200 when 0), then
    :func:`quantize_factors` when ``fmt`` is given."""
    if method not in ("tucker", "cp"):
        raise ValueError(f"method must be 'tucker' or 'cp', got {method!r}")
    target = copy.deepcopy(model)
    names = layers if layers is not None else [
        n for n, m in target.named_modules() if type(m) is nn.Conv2d and m.groups == 1]
    for name in names:
        conv = target.get_submodule(name)
        if method == "tucker":
            ro, ri = rank
            seq = tucker_conv(conv, (min(ro, conv.out_channels), min(ri, conv.in_channels)),
                              als_iters)
        else:
            seq = cp_conv(conv, rank, als_iters or 200)
        if fmt is not None:
            seq = quantize_factors(seq, fmt, group_size)
        parent, _, child = name.rpartition(".")
        setattr(target.get_submodule(parent) if parent else target, child, seq)
    return target
