"""The float32 pieces of a transformer decode step between its matmuls, as single kernel calls
(csrc/cpu/decode/api.h): RMSNorm with the residual add before it, SwiGLU's ``SiLU(gate) * up``,
and attention of one new position over a KV cache with rotate-half RoPE. Eager torch runs these
as ~25 small ops per layer; after each GEMV has streamed its weights through the caches every
one of them pays cold code (docs/speed.md "Seventeenth pass"). ``qkern.models.Llama`` decodes
through them.

Plain CPU functions, not ``torch.ops`` (the dispatcher's per-call cost is what they remove):
float32, contiguous CPU tensors, no autograd (a tensor that requires grad while grad is enabled
is refused), eager only. Values: docs/numerics.md "Decode-step kernels" (RoPE bit for bit as
eager torch; sums in float32 in an ISA-specific order)::

    >>> import torch
    >>> from qkern.ops.decode import rms_norm
    >>> x, w = torch.randn(2, 64), torch.rand(64)
    >>> ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    >>> bool(torch.allclose(rms_norm(x, w, 1e-5), ref, atol=1e-5))
    True
"""

from __future__ import annotations

import math
import operator

import torch

from .. import _C

__all__ = ["attention_step", "rms_norm", "silu_mul"]


def _f32(op: str, name: str, t) -> None:
    if isinstance(t, torch.Tensor) and t.is_cpu and t.dtype is torch.float32 and \
            t.is_contiguous() and not (t.requires_grad and torch.is_grad_enabled()):
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: {name} requires grad; these kernels have no autograd "
                         "(run under torch.no_grad() / inference_mode())")
    raise ValueError(f"{op}: {name} must be a contiguous float32 CPU tensor, got {t.dtype} on "
                     f"{t.device}{'' if t.is_contiguous() else ' (not contiguous)'}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """``weight * s / sqrt(mean(s ** 2, -1) + eps)`` over the last dimension, with ``s = x``,
    or ``s = x + residual`` when a residual is given: then returns ``(normed, s)``."""
    op = "rms_norm"
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    _f32(op, "x", x)
    _f32(op, "weight", weight)
    n = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or weight.shape != (n,):
        raise ValueError(f"{op}: weight must have shape ({n},) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if residual is not None:
        _f32(op, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual shape {tuple(residual.shape)} != x shape "
                             f"{tuple(x.shape)}")
    out = torch.empty_like(x)
    s = None if residual is None else torch.empty_like(x)
    rows = x.numel() // n if n else 0
    _C.rms_norm_raw(x.data_ptr(), 0 if s is None else residual.data_ptr(), weight.data_ptr(),
                    rows, n, float(eps), 0 if s is None else s.data_ptr(), out.data_ptr())
    return out if s is None else (out, s)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (``gate / (1 + exp(-gate)) * up``), elementwise."""
    _f32("silu_mul", "gate", gate)
    _f32("silu_mul", "up", up)
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate shape {tuple(gate.shape)} != up shape "
                         f"{tuple(up.shape)}")
    out = torch.empty_like(gate)
    _C.silu_mul_raw(gate.data_ptr(), up.data_ptr(), gate.numel(), out.data_ptr())
    return out


def attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int,
                   scale: float | None = None) -> torch.Tensor:
    """Attention of one new position per sequence. ``k_cache`` / ``v_cache``: (batch,
    kv_heads, max_len, head_dim); ``q``: batch x heads x head_dim values in that order (shaped
    (batch, heads, head_dim), or (batch, 1, heads * head_dim) as a projection returns them),
    heads a multiple of kv_heads; ``k``, ``v``: batch x kv_heads x head_dim values, this
    position's; ``cos`` / ``sin``: (head_dim,), the rotate-half RoPE tables' row of position
    ``pos``. Writes ``RoPE(k)`` and ``v`` at ``pos`` of the caches (in place), then returns
    ``softmax(scale * RoPE(q) K^T) V`` over positions ``0..pos``, shaped like ``q``; head ``h``
    reads kv head ``h // (heads // kv_heads)``. ``scale`` defaults to ``head_dim ** -0.5``."""
    op = "attention_step"
    try:
        pos = operator.index(pos)
    except TypeError:
        raise TypeError(f"{op}: pos must be an integer, got {type(pos).__name__}") from None
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite number, got {scale!r}")
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin),
                    ("k_cache", k_cache), ("v_cache", v_cache)):
        _f32(op, name, t)
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: k_cache and v_cache must be (batch, kv_heads, max_len, "
                         f"head_dim) alike, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    b, kvh, max_len, d = k_cache.shape
    group = b * kvh * d
    if group == 0 or q.numel() % group or k.numel() != group or v.numel() != group or \
            cos.numel() != d or sin.numel() != d or q.dim() == 0 or q.shape[0] != b:
        raise ValueError(f"{op}: for caches of shape {tuple(k_cache.shape)}, q needs batch {b} "
                         f"and heads x {d} values per sequence, heads a multiple of kv_heads "
                         f"{kvh}; k and v {group} values each, cos and sin {d}; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if k_cache.data_ptr() == v_cache.data_ptr():
        raise ValueError(f"{op}: k_cache and v_cache are the same memory")
    y = torch.empty_like(q)
    _C.attention_step_raw(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(),
                          sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), y.data_ptr(),
                          b, q.numel() // (b * d), kvh, d, max_len, pos,
                          float(d ** -0.5 if scale is None else scale))
    return y
