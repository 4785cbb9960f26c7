"""``qkern.quantize``: validation and dispatch onto the qkern:: ops (``dequantize`` lives with
QTensor in tensor.py)."""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _C
from . import formats as F
from ._checks import (
    as_tensor,
    check_device,
    check_float,
    nonfinite_message,
    normalize_axis,
    warn_user,
)
from .layout import GRANULARITIES, Layout
from .ops import NonFiniteError
from .tensor import (
    DoubleQuant,
    QTensor,
    check_quantize_out,
    fill_out,
    out_views,
    out_written,
)

# names in id order (csrc/core/rounding.h, affine.h), exported by qkern._C as {name: id}
ROUNDINGS = tuple(sorted(_C.ROUNDINGS, key=_C.ROUNDINGS.__getitem__))
QUANTIZERS = tuple(sorted(_C.QUANTIZERS, key=_C.QUANTIZERS.__getitem__))
assert [_C.ROUNDINGS[n] for n in ROUNDINGS] == list(range(len(ROUNDINGS)))
_OPS = torch.ops.qkern


def _choice(value, options, name):
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(options)}")
    return options.index(value)


def _seed_bits(seed) -> int:
    if seed is None:
        return int(torch.randint(0, 2**62, ()).item())
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    s = seed & 0xFFFFFFFFFFFFFFFF
    return s - (1 << 64) if s >= 1 << 63 else s  # int64 bits for the op schema


def _layout(x: torch.Tensor, fmt: F.Format, granularity, axis, group_size) -> Layout:
    shape = tuple(x.shape)
    if granularity is None:
        granularity = "group" if fmt.block_size is not None else "tensor"
    _choice(granularity, GRANULARITIES, "granularity")
    numel = math.prod(shape)
    if granularity == "tensor":
        return Layout("tensor", shape, None, max(numel, 1))
    if x.dim() == 0:
        raise ValueError(f"granularity={granularity!r} needs a tensor with at least 1 dimension")
    if granularity == "channel":
        ax = normalize_axis(0 if axis is None else axis, x.dim())
        per = numel // shape[ax] if shape[ax] else 0
        return Layout("channel", shape, ax, max(per, 1))
    ax = normalize_axis(-1 if axis is None else axis, x.dim())
    if group_size is None:
        group_size = fmt.block_size
    if group_size is None:
        raise ValueError(f"granularity='group' needs group_size (format {fmt.name} has no default)")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if shape[ax] % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide dimension {ax} of size {shape[ax]}"
        )
    return Layout("group", shape, ax, group_size)


def _given(value, layout: Layout, name: str, dtype) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype)
    if t.dim() == 0 and layout.n_groups == 1:
        t = t.reshape(layout.scale_shape)
    if tuple(t.shape) != layout.scale_shape:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}; granularity={layout.granularity!r} needs "
            f"{layout.scale_shape}"
        )
    return t


def _check_scale(scale: torch.Tensor) -> None:
    if not torch.isfinite(scale).all():
        raise ValueError("scale must be finite; it contains NaN or Inf")
    if (scale <= 0).any():
        raise ValueError(f"scale must be > 0; smallest given is {float(scale.min())}")
    if not torch.isfinite(1.0 / scale).all():  # the kernels multiply by 1/scale in float32
        raise ValueError(f"scale {float(scale.min())} is too small: 1/scale overflows float32")


def _integral(value):
    """A zero point as given, refused when it is not integer-valued (1.7 silently became 1)."""
    t = torch.as_tensor(value)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"zero_point must hold integers, got {t.dtype}")
    if t.is_floating_point() and t.numel() and not bool((t == t.round()).all()
                                                       & torch.isfinite(t).all()):
        bad = t[(t != t.round()) | ~torch.isfinite(t)].reshape(-1)[0]
        raise ValueError(f"zero_point must be integer-valued, got {float(bad)!r}")
    return t


def _check_zero_point(zp: torch.Tensor, fmt: F.Format) -> None:
    if zp.numel() and (zp.min() < fmt.qmin or zp.max() > fmt.qmax):
        raise ValueError(
            f"zero_point must lie in the code range [{fmt.qmin}, {fmt.qmax}] of {fmt.name}; "
            f"got values in [{int(zp.min())}, {int(zp.max())}]"
        )


def _check_options(fmt, symmetric, quantizer, qshape, deadzone, clip_ratio, double_quant):
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    if qshape and not symmetric:
        raise ValueError(f"quantizer={quantizer!r} is symmetric only: pass symmetric=True")
    if qshape == 2 and not (isinstance(deadzone, (int, float)) and deadzone >= 1.0):
        raise ValueError(f"deadzone (zero-bin width in steps) must be >= 1, got {deadzone!r}")
    if not symmetric and (fmt.kind != "int" or fmt.symmetric_only):
        raise ValueError(f"format {fmt.name} is symmetric only: pass symmetric=True")
    if qshape and fmt.kind != "int":
        raise ValueError(f"quantizer={quantizer!r} applies to integer formats, not {fmt.name}")
    if fmt.kind == "int" and fmt.qmax == 0 and symmetric and qshape != 1:
        raise ValueError(f"{fmt.name} has no positive level for a symmetric {quantizer} "
                         "quantizer; use quantizer='midrise', symmetric=False or 'binary'")
    if clip_ratio is not None and not (0.0 < clip_ratio <= 1.0):
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if double_quant and (fmt.kind != "codebook" or fmt.scale_rule == F.SCALE_POW2_MX):
        raise ValueError(f"double_quant applies to codebook block formats with float scales "
                         f"(nf4, fp4_*), not {fmt.name}"
                         + (" (MX scales are powers of two, stored as E8M0)"
                            if fmt.scale_rule == F.SCALE_POW2_MX else ""))


def _given_params(scale, zero_point, symmetric, layout, fmt):
    """The user's scale / zero point, validated, in user layout (or None)."""
    sc = zp = None
    if scale is not None:
        sc = _given(scale, layout, "scale", torch.float32)
        _check_scale(sc)
    if zero_point is not None:
        if symmetric:
            raise ValueError("zero_point is given but symmetric=True; pass symmetric=False")
        if sc is None:
            raise ValueError("zero_point needs scale too")
        zp = _given(_integral(zero_point), layout, "zero_point", torch.int64)
        _check_zero_point(zp, fmt)
        zp = zp.to(torch.int32)
    if not symmetric and sc is not None and zp is None:
        raise ValueError("symmetric=False with a given scale needs zero_point too")
    return sc, zp


def check_params(fmt, layout: Layout, scale, zero_point=None, symmetric: bool = True,
                 quantizer: str = "midtread") -> None:
    """The checks :func:`quantize` applies to a given ``scale`` / ``zero_point`` for a tensor
    of ``layout`` (the options, the scale's shape, finite positive scales, zero points in the
    format's code range), without the tensor: ValueError naming the problem."""
    fmt = F.get(fmt)
    qshape = _choice(quantizer, QUANTIZERS, "quantizer")
    _check_options(fmt, symmetric, quantizer, qshape, 1.0, None, False)
    _given_params(scale, zero_point, symmetric, layout, fmt)


def quantize(x, fmt, *, granularity: str | None = None, axis: int | None = None,
             group_size: int | None = None, symmetric: bool = True,
             rounding: str = "nearest_even", quantizer: str = "midtread", deadzone: float = 1.0,
             clip: tuple[float, float] | None = None, clip_ratio: float | None = None,
             scale=None, zero_point=None, seed: int | None = None,
             double_quant: bool = False, out: QTensor | None = None) -> QTensor:
    """Quantize ``x`` to format ``fmt``; see README "Quantize" and docs/numerics.md.
    ``out``: a QTensor of the same format, layout and kind of zero point (e.g. an earlier
    result) whose codes, scale and zero point are overwritten in place and returned
    (docs/speed.md, "Preallocated outputs")."""
    fmt = F.get(fmt)
    x = detached_input(as_tensor(x))
    check_float(x)
    check_device(x)
    rmode = _choice(rounding, ROUNDINGS, "rounding")
    qshape = _choice(quantizer, QUANTIZERS, "quantizer")
    layout = _layout(x, fmt, granularity, axis, group_size)
    _check_options(fmt, symmetric, quantizer, qshape, deadzone, clip_ratio, double_quant)
    seed_bits = _seed_bits(seed) if rmode == 6 else 0

    if clip is not None:
        lo, hi = clip
        if not lo < hi:
            raise ValueError(f"clip=(lo, hi) needs lo < hi, got {clip!r}")
        x = x.clamp(lo, hi)
    xk = layout.to_kernel(x.float()) if x.numel() else x.float().reshape(-1)
    sc, zp = _given_params(scale, zero_point, symmetric, layout, fmt)
    if out is not None:
        check_quantize_out(out, fmt, layout, symmetric, x.device, _code_dtype(fmt))
    dst = out_views(out, layout, x.device) if fmt.kind != "companded" else None

    qt_args = {"format": fmt, "layout": layout, "dtype": x.dtype, "quantizer": quantizer}
    if x.numel() == 0 and out is not None:
        return fill_out(out, None, None, None, (True, True, True), dtype=x.dtype,
                      quantizer=quantizer)
    if x.numel() == 0:
        empty_scale = torch.ones(layout.scale_shape) if sc is None else sc
        return QTensor(torch.empty(layout.shape, dtype=_code_dtype(fmt)), empty_scale,
                       None if symmetric else torch.zeros(layout.scale_shape, dtype=torch.int32),
                       **qt_args)
    g = layout.group_size
    try:
        if fmt.kind == "companded":
            codes, sck = _companded(xk, fmt, g, rmode, seed_bits, sc, layout)
            zpk, dq = None, None
        elif fmt.kind == "int":
            codes, sck, zpk = _affine(xk, fmt, g, symmetric, rmode, qshape, deadzone, seed_bits,
                                      sc, zp, layout, clip_ratio, dst)
            dq = None
        else:
            codes, sck, dq = _codebook(xk, fmt, g, rmode, seed_bits, sc, layout, clip_ratio,
                                       double_quant, dst)
            zpk = None
    except NonFiniteError:
        raise ValueError(nonfinite_message(x)) from None
    done = out_written(dst, codes, sck, zpk)
    codes = layout.from_kernel(codes)
    if fmt.kind == "int" and fmt.signed:
        codes = codes.view(torch.int8)
    scale_out = layout.scale_from_kernel(sck)
    zp_out = None if zpk is None else layout.scale_from_kernel(zpk)
    if out is not None:
        return fill_out(out, codes, scale_out, zp_out, done, double_quant=dq, dtype=x.dtype,
                      quantizer=quantizer)
    return QTensor(codes, scale_out, zp_out, double_quant=dq, **qt_args)


def _code_dtype(fmt: F.Format) -> torch.dtype:
    return torch.int8 if fmt.kind == "int" and fmt.signed else torch.uint8


def _affine(xk, fmt, g, symmetric, rmode, qshape, deadzone, seed, sc, zp, layout, clip_ratio,
            dst=None):
    """Kernel-order codes, scale, zero point; ``dst``: flat views of out= the ops write."""
    # float32 arithmetic, as docs/numerics.md defines h = (w - 1) * 0.5f
    dz_half = 0.0
    if qshape == 2:
        dz_half = float((np.float32(deadzone) - np.float32(1)) * np.float32(0.5))
    if sc is None:
        rule = fmt.scale_rule if symmetric else F.SCALE_MINMAX
        qpos = fmt.qmax + (0.5 if qshape == 1 else 0.0)
        args = (xk, g, fmt.qmin, fmt.qmax, rule, qpos, fmt.emax, rmode, qshape, dz_half, seed)
        if dst is None:
            codes, sck, zpk = _OPS.quantize_affine_dynamic(*args)
        else:
            codes, sck, zpk = dst[0], dst[1], dst[2] if rule == F.SCALE_MINMAX else dst[2][:0]
            _OPS.quantize_affine_dynamic_out(*args, codes, sck, zpk)
        if not symmetric and fmt.qmax - fmt.qmin == 1 and not torch.compiler.is_compiling():
            _check_range_scale(sck, fmt)
        if clip_ratio is None or clip_ratio == 1.0:
            return codes, sck, (None if symmetric else zpk)
        sc_k = sck * clip_ratio
        zp_k = None if symmetric else zpk
    else:
        sc_k = layout.scale_to_kernel(sc)
        zp_k = None if zp is None else layout.scale_to_kernel(zp)
    args = (xk, sc_k, zp_k, g, fmt.qmin, fmt.qmax, rmode, qshape, dz_half, seed)
    if dst is None:
        return _OPS.quantize_affine(*args), sc_k, zp_k
    _OPS.quantize_affine_out(*args, dst[0])
    return dst[0], sc_k, zp_k


def _check_range_scale(sck: torch.Tensor, fmt: F.Format) -> None:
    """An asymmetric scale is finite for finite data (docs/numerics.md, "range overflow":
    at most 2 FLT_MAX / (qmax - qmin)), except for a 1-bit grid over a range beyond FLT_MAX."""
    if not bool(torch.isfinite(sck).all()):
        raise ValueError(f"the data's range max(x, 0) - min(x, 0) over {fmt.qmax - fmt.qmin} "
                         f"step(s) of {fmt.name} needs a scale beyond float32's largest value")


def _table(fmt):
    vals, cods = fmt.search_table
    return torch.from_numpy(vals), torch.from_numpy(cods)


def _codebook(xk, fmt, g, rmode, seed, sc, layout, clip_ratio, double_quant, dst=None):
    vals, cods = (t.to(xk.device) for t in _table(fmt))
    dq = None
    if sc is None:
        args = (xk, vals, cods, fmt.sign_bit, g, fmt.scale_rule, fmt.max_value, fmt.emax, rmode,
                seed)
        if dst is None:
            codes, sck = _OPS.quantize_codebook_dynamic(*args)
        else:
            codes, sck = dst[0], dst[1]
            _OPS.quantize_codebook_dynamic_out(*args, codes, sck)
        if (clip_ratio is None or clip_ratio == 1.0) and not double_quant:
            return codes, sck, None
        if clip_ratio is not None:
            sck = sck * clip_ratio
        if double_quant:
            dq, sck = double_quantize_scales(sck)
    else:
        sck = layout.scale_to_kernel(sc)
    args = (xk, sck, vals, cods, fmt.sign_bit, g, rmode, seed)
    if dst is None:
        return _OPS.quantize_codebook(*args), sck, dq
    _OPS.quantize_codebook_out(*args, dst[0])
    return dst[0], sck, dq


def double_quantize_scales(s: torch.Tensor, group: int = 256) -> tuple[DoubleQuant, torch.Tensor]:
    """bitsandbytes-style nested quantization of block scales: the mean, then int8 of the
    residual per ``group`` blocks. Returns the codes and the dequantized scales."""
    mean = float(s.double().mean())
    resid = s - torch.tensor(mean, dtype=torch.float32)
    pad = (-resid.numel()) % group
    r = torch.cat([resid, resid.new_zeros(pad)]).view(-1, group)
    codes, s2, _ = _OPS.quantize_affine_dynamic(r.reshape(-1), group, -128, 127, F.SCALE_ABSMAX,
                                                127.0, 0, 0, 0, 0.0, 0)
    deq = _OPS.dequantize_affine(codes, s2, None, group, True, 0.0)[: s.numel()]
    scales = deq + torch.tensor(mean, dtype=torch.float32)
    scales = scales.clamp_min(torch.finfo(torch.float32).tiny)
    return DoubleQuant(codes.view(torch.int8)[: s.numel()].clone(), s2, mean, group), scales


def _counter_uniform(seed: int, n: int) -> torch.Tensor:
    """docs/numerics.md's counter RNG in torch int64 arithmetic (wrapping, logical shifts)."""
    def srl(z, k):
        return (z >> k) & ((1 << (64 - k)) - 1)

    def wrap(v):
        return v - (1 << 64) if v >= 1 << 63 else v

    i = torch.arange(1, n + 1, dtype=torch.int64)
    z = seed + i * wrap(0x9E3779B97F4A7C15)
    z = (z ^ srl(z, 30)) * wrap(0xBF58476D1CE4E5B9)
    z = (z ^ srl(z, 27)) * wrap(0x94D049BB133111EB)
    z = z ^ srl(z, 31)
    return srl(z, 40).to(torch.float32) * 2.0**-24


def _round_torch(t: torch.Tensor, rmode: int, seed: int) -> torch.Tensor:
    """The rounding modes of docs/numerics.md on a float32 tensor, exactly (via float64)."""
    d = t.double()
    if rmode == 0:
        return torch.round(d)
    if rmode == 1:
        r = torch.trunc(d)
        return r + torch.sign(d) * ((d - r).abs() >= 0.5)
    if rmode == 2:
        return torch.floor(d + 0.5)
    if rmode == 6:
        r = torch.floor(d)
        u = _counter_uniform(seed, t.numel()).view(t.shape).double()
        return r + (u < (d - r).float().double())
    if rmode == 7:  # away from zero
        return torch.where(d >= 0, torch.ceil(d), torch.floor(d))
    return (None, None, None, torch.floor, torch.ceil, torch.trunc)[rmode](d)


def _companded(xk, fmt, g, rmode, seed, sc, layout):
    xg = xk.view(-1, g)
    if not torch.isfinite(xg).all():
        raise NonFiniteError("non-finite")
    if sc is None:
        sck = (xg.abs().amax(dim=1) / fmt.max_value)
        sck = torch.where(sck > 0, sck.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
    else:
        sck = layout.scale_to_kernel(sc)
    t = _round_torch(xg * (1.0 / sck)[:, None], rmode, seed)
    pcm = t.clamp(-32768, 32767).to(torch.int16).reshape(-1)
    enc = _OPS.mulaw_encode if fmt.name == "mulaw" else _OPS.alaw_encode
    return enc(pcm), sck


# ---- gradients: quantize() is data, fake_quantize() is the straight-through path ---------------

class QuantizeGradientWarning(UserWarning):
    """``qkern.quantize`` was given a tensor that requires grad: the QTensor is detached."""


def detached_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached from autograd: a QTensor's codes and scales are data with no gradient.
    Warns (:class:`QuantizeGradientWarning`) when grad mode is on and ``x`` requires grad, since
    the caller may expect one; ``fake_quantize`` is the differentiable path."""
    if not x.requires_grad:
        return x
    if torch.is_grad_enabled():
        warn_user("qkern.quantize: x requires grad, but quantize() has no gradient; the QTensor is "
                  "detached from x's graph (its dequantize() gives no gradient to x). Use "
                  "qkern.fake_quantize(x, fmt, ...) for a straight-through gradient, or pass "
                  "x.detach() / call under torch.no_grad() to silence this",
                  QuantizeGradientWarning)
    return x.detach()


def ste_mask(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """Where the clipped straight-through estimator passes the gradient of ``q = quantize(x)``:
    the elements within the group's representable range extended by half a step at each end
    (the inputs the quantizer rounds to a value without clamping), bool like ``x``."""
    fmt, lay = q.format, q.layout
    g = lay.group_size
    xk = lay.to_kernel(x.detach().float()).reshape(-1, g)
    sk = lay.scale_to_kernel(q.scale.float()).reshape(-1, 1)
    if fmt.kind == "int":
        v = torch.arange(fmt.qmin, fmt.qmax + 1, dtype=torch.float32, device=x.device)
        if q.quantizer == "midrise":
            v = v + 0.5
    else:
        v = fmt.codebook.to(x.device)
    if v.numel() > 1:
        lo_unit, hi_unit = v[0] - (v[1] - v[0]) / 2, v[-1] + (v[-1] - v[-2]) / 2
    else:
        lo_unit = hi_unit = v[0]
    shift = 0.0
    if q.zero_point is not None:
        shift = lay.scale_to_kernel(q.zero_point).reshape(-1, 1).float()
    lo, hi = (lo_unit - shift) * sk, (hi_unit - shift) * sk
    inside = (xk >= lo) & (xk <= hi)
    return lay.from_kernel(inside.reshape(-1))


def fake_quantize(x, fmt, **kwargs) -> torch.Tensor:
    """``dequantize(quantize(x, fmt, **kwargs))`` in ``x``'s dtype, differentiable with the
    clipped straight-through estimator: the gradient is passed unchanged (1) where ``x`` lies in
    its group's representable range (within half a step of the extreme values: where the
    quantizer did not clamp) and inside ``clip=(lo, hi)`` when given, and is 0 elsewhere. Codes
    and scales are data (no gradient). Takes every ``quantize`` keyword (README, "Training
    through quantized layers")."""
    x = as_tensor(x)
    q = quantize(x.detach(), fmt, **kwargs)
    y = q.dequantize()
    if not (x.requires_grad and torch.is_grad_enabled()) or x.numel() == 0:
        return y
    mask = ste_mask(x, q)
    clip = kwargs.get("clip")
    if clip is not None:
        mask = mask & (x.detach() >= clip[0]) & (x.detach() <= clip[1])
    # value y, gradient mask: (x - x.detach()) is 0 in the forward
    return y + torch.where(mask, x - x.detach(), torch.zeros_like(x))
