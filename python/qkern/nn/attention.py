"""Integer attention: ``softmax(Q K^T * scaling + mask) V`` with int8 Q, K, V and a quantized
softmax P, both matmuls on integer operands with int32 accumulation (docs/attention.md).

Per head h (scales calibrated by
:class:`qkern.quantization.algorithms.attention_int8.QuantizedAttentionConfig`):

- K: ``k = clamp(round(K / s_k), -127, 127)`` with ``s_k`` one scale per head (``(H, 1)``) or
  per head and channel (``(H, D)``); Q: ``q = clamp(round((Q * s_k) / s_q), -127, 127)`` when
  K is per channel (the channel scales of K move into Q, so ``q . k`` stays one integer dot
  product), else ``clamp(round(Q / s_q), -127, 127)``; V: ``clamp(round(V / s_v), -127, 127)``.
  Rounding is to nearest, ties to even; every division is float32.
- ``S = float(q k^T) * (s_q * s_k * scaling)`` (per-channel K: ``* (s_q * scaling)``); the
  integer product is ``qkern::gemm_s8s8_s32`` (int32 accumulation, exact) run once per (batch,
  head) with the K codes packed by ``qkern::pack_w8`` as its weight operand.
- ``P = softmax(S + mask)`` in float32; a row whose keys are all masked gives P = 0.
- ``p_fmt="uint8"``: ``p = clamp(round(255 P), 0, 255)`` and ``O = float(p v) * (s_v / 255)``,
  the integer product again on ``gemm_s8s8_s32``: the V codes are its (per-row) activation
  operand and ``p - 128`` (in [-128, 127]) its weight, ``p v = (p - 128) v + 128 sum_j v_j``.
  ``p_fmt="fp8_e4m3"``: ``p = e4m3(P)`` (qkern's fp8_e4m3 grid, scale 1) and
  ``O = float32(p v) * s_v`` with ``p v`` summed in float64: every product is a multiple of
  2^-9 below 2^7 and every partial sum is far below 2^53 * 2^-9, so that sum is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantize import fake_quantize

__all__ = ["P_FORMATS", "Int8Attention", "int8_bmm", "quantize_sym"]

#: the formats of the softmax probabilities P
P_FORMATS = ("uint8", "fp8_e4m3")
#: the int32 accumulation of gemm_s8s8_s32 is exact up to this inner size (K * 127 * 128)
MAX_K = 132104

_OPS = torch.ops.qkern


def quantize_sym(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes ``clamp(round(x / scale), -127, 127)`` (float32 division, ties to even)."""
    return torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)


def int8_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc[..., m, n] = sum_k a[..., m, k] * b[..., n, k]`` in int32, exact: ``a`` int8 codes
    in [-127, 127] (..., M, K), ``b`` int8 (..., N, K) with the same leading shape. Runs
    ``qkern::gemm_s8s8_s32`` once per leading index, ``b[i]`` packed by ``qkern::pack_w8``."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError("int8_bmm: a and b must be tensors")
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"int8_bmm: a and b must be int8, got {a.dtype} and {b.dtype}")
    if a.dim() < 2 or b.dim() != a.dim() or a.shape[:-2] != b.shape[:-2] \
            or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"int8_bmm: shapes (..., M, K) and (..., N, K) with the same leading "
                         f"dims needed, got {tuple(a.shape)} and {tuple(b.shape)}")
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-2]
    if k > MAX_K:
        raise ValueError(f"int8_bmm: K={k} could overflow the int32 accumulator (max {MAX_K})")
    lead = a.shape[:-2]
    out = torch.zeros((*lead, m, n), dtype=torch.int32)
    if out.numel() == 0 or k == 0:
        return out
    if bool((a == -128).any()):
        raise ValueError("int8_bmm: a must hold codes in [-127, 127] (found -128)")
    a3, b3, o3 = a.reshape(-1, m, k), b.reshape(-1, n, k), out.view(-1, m, n)
    for i in range(a3.shape[0]):
        o3[i] = _OPS.gemm_s8s8_s32(a3[i], _OPS.pack_w8(b3[i].contiguous()), n, k)
    return out


def _scale_tensor(name: str, v, heads: int | None, cols: int | None) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).detach().clone()
    if t.dim() == 1:
        t = t.reshape(-1, 1)
    if t.dim() != 2 or (heads is not None and t.shape[0] != heads) \
            or (cols is not None and t.shape[1] not in (1, cols)):
        raise ValueError(f"Int8Attention: {name} must be (heads,) or (heads, channels), got "
                         f"{tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError(f"Int8Attention: {name} must be finite and > 0")
    return t


class Int8Attention(nn.Module):
    """The integer attention of one attention layer (module docstring): calibrated scales
    ``q_scale`` (H,), ``k_scale`` (H,) or (H, D) (per channel), ``v_scale`` (H,) and the
    probability format ``p_fmt`` (``"uint8"``: scale 1/255, or ``"fp8_e4m3"``).

    It is what ``QuantizedAttentionConfig`` attaches to each attention module (as
    ``qat_attention``, the hook of :mod:`qkern.quantization.qat.attention`); on its own:

    >>> import torch
    >>> att = Int8Attention(torch.full((2,), 0.05), torch.full((2,), 0.05),
    ...                     torch.full((2,), 0.02))
    >>> q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    >>> out, p = att.attend(q, k, v, None, 8 ** -0.5)
    >>> out.shape, bool((p * 255 - (p * 255).round()).abs().max() < 1e-4)
    (torch.Size([1, 2, 5, 8]), True)
    """

    def __init__(self, q_scale, k_scale, v_scale, p_fmt: str = "uint8"):
        super().__init__()
        if p_fmt not in P_FORMATS:
            raise ValueError(f"Int8Attention: p_fmt must be one of {P_FORMATS}, got {p_fmt!r}")
        qs = _scale_tensor("q_scale", q_scale, None, 1)
        h = qs.shape[0]
        self.register_buffer("q_scale", qs.reshape(h))
        self.register_buffer("k_scale", _scale_tensor("k_scale", k_scale, h, None))
        self.register_buffer("v_scale", _scale_tensor("v_scale", v_scale, h, 1).reshape(h))
        self.p_fmt = p_fmt

    @property
    def heads(self) -> int:
        return self.q_scale.shape[0]

    @property
    def k_per_channel(self) -> bool:
        return self.k_scale.shape[1] > 1

    def extra_repr(self) -> str:
        k = "per channel" if self.k_per_channel else "per head"
        return f"heads={self.heads}, k {k}, p_fmt={self.p_fmt}"

    def codes(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """The int8 codes ``(q, k, v)`` of (B, H, T, D) query / key / value."""
        h, d = self.heads, query.shape[-1]
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 4 or t.shape[1] != h or t.shape[-1] != d:
                raise ValueError(f"Int8Attention: {name} must be (B, {h}, T, {d}), got "
                                 f"{tuple(t.shape)}")
        if self.k_per_channel and self.k_scale.shape[1] != d:
            raise ValueError(f"Int8Attention: k_scale has {self.k_scale.shape[1]} channels, "
                             f"the head dim is {d}")
        sk = self.k_scale.view(1, h, 1, -1)
        qf = query.float() * sk if self.k_per_channel else query.float()
        return (quantize_sym(qf, self.q_scale.view(1, h, 1, 1)), quantize_sym(key, sk),
                quantize_sym(value, self.v_scale.view(1, h, 1, 1)))

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
               training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(O, P)`` (P dequantized) in ``query``'s dtype; query (B, H, Tq, D), key / value
        (B, H, Tk, D) as attended; ``mask`` additive float or boolean (True = attend),
        broadcastable to (B, H, Tq, Tk). Inference only: ``dropout`` must be 0 in training."""
        if training and dropout > 0:
            raise ValueError("Int8Attention is inference only: attention dropout > 0 in training")
        h = self.heads
        qc, kc, vc = self.codes(query, key, value)
        if kc.shape[0] != qc.shape[0] or vc.shape[:3] != kc.shape[:3]:
            raise ValueError(f"Int8Attention: key {tuple(key.shape)} and value "
                             f"{tuple(value.shape)} do not match query {tuple(query.shape)}")
        step = self.q_scale.view(1, h, 1, 1)
        if not self.k_per_channel:
            step = step * self.k_scale.view(1, h, 1, 1)
        step = step * float(scaling)
        s = int8_bmm(qc, kc).float() * step
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        p = torch.nan_to_num(F.softmax(s, dim=-1, dtype=torch.float32), nan=0.0)
        sv = self.v_scale.view(1, h, 1, 1)
        if self.p_fmt == "uint8":
            pc = torch.round(p * 255.0).clamp_(0, 255)
            pw = (pc - 128).to(torch.int8)  # the weight operand: [-128, 127]
            vt = vc.transpose(-2, -1).contiguous()  # (B, H, D, Tk): the activation operand
            acc = int8_bmm(vt, pw) + 128 * vc.sum(2, dtype=torch.int32).unsqueeze(-1)
            out = acc.transpose(-2, -1).float() * (sv / 255.0)
            pq = pc / 255.0
        else:
            pq = fake_quantize(p, "fp8_e4m3", granularity="tensor",
                               scale=torch.tensor(1.0)) if p.numel() else p
            out = torch.matmul(pq.double(), vc.double()).float() * sv
        return out.to(query.dtype), pq.to(query.dtype)
