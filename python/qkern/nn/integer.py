"""Integer-only modules (docs/integer_only.md): int8 tensors in, int8 tensors out, every
operation inside on integers (int32 accumulation, int32 bias, the fixed-point requantization
``qkern::requantize`` with ``m0`` / ``shift``, ReLU folded into the clamp). The float scales
the layers were built from stay as metadata (``in_scale`` / ``out_scale``) for the float
boundary (:class:`FloatBoundary`, :class:`IntegerModel`); ``forward`` never reads them.

An activation code ``q`` stands for the real value ``(q - zero_point) * scale``.

>>> import torch
>>> from qkern.fixed_point import quantize_multipliers
>>> lin = IntegerLinear(torch.tensor([[2, -1]], dtype=torch.int8), torch.tensor([5]),
...                     *quantize_multipliers(torch.tensor([0.25], dtype=torch.float64)),
...                     in_zp=-3, out_zp=1, qmin=1, qmax=127)      # ReLU folded: qmin = out_zp
>>> lin(torch.tensor([[7, 2]], dtype=torch.int8))  # ((10*2 - 5) + 5) / 4 + 1 = 6
tensor([[6]], dtype=torch.int8)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FloatBoundary", "IntegerAvgPool2d", "IntegerConv2d", "IntegerLinear",
           "IntegerLinearIO", "IntegerMaxPool2d", "IntegerModel", "IntegerReLU"]

I32 = torch.int32


def _check_int8(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int8:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} takes int8 activation codes, got {got} (quantize the float "
                        "input with FloatBoundary / IntegerModel.quantize)")


OUT_DTYPES = {8: torch.int8, 16: torch.int16}


class _Requant(nn.Module):
    """The output stage shared by the integer layers: int32 bias, per-channel ``m0`` / ``shift``
    (``M = s_in s_w / s_out``), output zero point and the clamp ``[qmin, qmax]``; int8 output
    codes, or int16 (``out_bits=16``) where the consumer is a float op (layers mode)."""

    def __init__(self, bias_q, m0, shift, in_zp: int, out_zp: int, qmin: int, qmax: int,
                 in_scale: float = 1.0, out_scale: float = 1.0, out_bits: int = 8):
        super().__init__()
        if out_bits not in OUT_DTYPES:
            raise ValueError(f"out_bits must be 8 or 16, got {out_bits!r}")
        lo, hi = -(1 << (out_bits - 1)), (1 << (out_bits - 1)) - 1
        if not lo <= qmin <= qmax <= hi:
            raise ValueError(f"need {lo} <= qmin <= qmax <= {hi} (out_bits={out_bits}), got "
                             f"[{qmin}, {qmax}]")
        if not -128 <= int(in_zp) <= 127:
            raise ValueError(f"in_zp must be an int8 value, got {in_zp}")
        if not lo <= int(out_zp) <= hi:
            raise ValueError(f"out_zp must be an int{out_bits} value, got {out_zp}")
        self.out_bits = out_bits
        self.register_buffer("bias_q", torch.as_tensor(bias_q, dtype=I32).reshape(-1).clone())
        self.register_buffer("m0", torch.as_tensor(m0, dtype=I32).reshape(-1).clone())
        self.register_buffer("shift", torch.as_tensor(shift, dtype=I32).reshape(-1).clone())
        self.in_zp, self.out_zp, self.qmin, self.qmax = int(in_zp), int(out_zp), qmin, qmax
        self.in_scale, self.out_scale = float(in_scale), float(out_scale)  # metadata only

    def requant(self, acc: torch.Tensor) -> torch.Tensor:
        """acc (..., C) int32 -> (..., C) int8 (int16: the int32 kernel output clamped to
        ``[qmin, qmax]`` inside the int16 range, narrowed)."""
        if self.bias_q.numel():
            acc = acc + self.bias_q
        if self.out_bits == 8:
            return torch.ops.qkern.requantize(acc, self.m0, self.shift, self.out_zp, self.qmin,
                                              self.qmax, 8)
        return torch.ops.qkern.requantize(acc, self.m0, self.shift, self.out_zp, self.qmin,
                                          self.qmax, 32).to(torch.int16)


class IntegerLinear(_Requant):
    """``y_q = clamp(requant((x_q - in_zp) @ w_q^T + bias_q) + out_zp, qmin, qmax)``; ``w_q``
    (N, K) int8 (symmetric: weight zero point 0), ``bias_q`` (N,) int32 (or empty), ``m0`` /
    ``shift`` (N,) or (1,) int32; ``out_bits=16``: int16 output codes (zero point and clamp in
    the int16 range), for an output that goes to a float op."""

    def __init__(self, w_q, bias_q, m0, shift, *, in_zp: int, out_zp: int, qmin: int = -128,
                 qmax: int = 127, in_scale: float = 1.0, out_scale: float = 1.0,
                 out_bits: int = 8):
        super().__init__(bias_q, m0, shift, in_zp, out_zp, qmin, qmax, in_scale, out_scale,
                         out_bits)
        w = torch.as_tensor(w_q)
        if w.dtype != torch.int8 or w.dim() != 2:
            raise TypeError(f"w_q must be an (N, K) int8 tensor, got {w.dtype} {tuple(w.shape)}")
        self.register_buffer("w_q", w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_int8("IntegerLinear", x)
        k = self.w_q.shape[1]
        xi = x.reshape(-1, k).to(I32) - self.in_zp
        acc = torch.mm(xi, self.w_q.to(I32).t())
        return self.requant(acc).reshape(*x.shape[:-1], self.w_q.shape[0])

    def extra_repr(self) -> str:
        n, k = self.w_q.shape
        return f"{k} -> {n}, in_zp={self.in_zp}, out_zp={self.out_zp}, clamp=[{self.qmin}, " \
               f"{self.qmax}], out int{self.out_bits}"


class IntegerConv2d(_Requant):
    """A 2-d convolution (groups 1, dilation 1) on int8 codes: padding with the input zero
    point (the real value 0), patches as integer views, an int32 GEMM and the requantization
    per output channel."""

    def __init__(self, w_q, bias_q, m0, shift, stride, padding, *, in_zp: int, out_zp: int,
                 qmin: int = -128, qmax: int = 127, in_scale: float = 1.0,
                 out_scale: float = 1.0):
        super().__init__(bias_q, m0, shift, in_zp, out_zp, qmin, qmax, in_scale, out_scale)
        w = torch.as_tensor(w_q)
        if w.dtype != torch.int8 or w.dim() != 4:
            raise TypeError(f"w_q must be a (Cout, Cin, kh, kw) int8 tensor, got {w.dtype} "
                            f"{tuple(w.shape)}")
        self.register_buffer("w_q", w.clone())
        self.stride, self.padding = tuple(stride), tuple(padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_int8("IntegerConv2d", x)
        (sh, sw), (ph, pw) = self.stride, self.padding
        co, ci, kh, kw = self.w_q.shape
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph), value=self.in_zp)
        xi = x.to(I32) - self.in_zp
        p = xi.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, Ho, Wo, kh, kw)
        b, _, ho, wo = p.shape[:4]
        cols = p.permute(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, ci * kh * kw)
        acc = torch.mm(cols, self.w_q.reshape(co, -1).to(I32).t())
        return self.requant(acc).reshape(b, ho, wo, co).permute(0, 3, 1, 2).contiguous()


class IntegerMaxPool2d(nn.Module):
    """Max pooling of int8 codes (no padding): the maximum commutes with the affine map."""

    def __init__(self, kernel_size, stride):
        super().__init__()
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_int8("IntegerMaxPool2d", x)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        return x.unfold(2, kh, sh).unfold(3, kw, sw).amax(dim=(-2, -1))


class IntegerAvgPool2d(nn.Module):
    """Average pooling of int8 codes (no padding): the int32 window sum divided by the window
    size, rounded to nearest with ties away from zero (the scale and zero point are kept)."""

    def __init__(self, kernel_size, stride):
        super().__init__()
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_int8("IntegerAvgPool2d", x)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        s = x.to(I32).unfold(2, kh, sh).unfold(3, kw, sw).sum(dim=(-2, -1), dtype=I32)
        n = kh * kw
        q = torch.div(s.abs() + n // 2, n, rounding_mode="floor")
        return torch.where(s < 0, -q, q).to(torch.int8)


class IntegerReLU(nn.Module):
    """ReLU on codes with zero point ``zp``: ``max(q, zp)`` (where it cannot be folded into
    the clamp of the layer before)."""

    def __init__(self, zp: int):
        super().__init__()
        self.zp = int(zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_int8("IntegerReLU", x)
        return x.clamp_min(self.zp)


class FloatBoundary(nn.Module):
    """Float <-> int8 at the edge of an integer model: ``quantize(x) = clamp(round(x / scale)
    + zp, -128, 127)`` (round half to even), ``dequantize(q) = (q - zp) * scale``."""

    def __init__(self, scale: float, zero_point: int):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale, self.zero_point = float(scale), int(zero_point)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x.float() / self.scale) + self.zero_point
        return q.clamp(-128, 127).to(torch.int8)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return (q.to(torch.float32) - self.zero_point) * self.scale


class IntegerLinearIO(nn.Module):
    """An :class:`IntegerLinear` between two float boundaries (IntegerOnlyConfig's ``layers``
    mode, for models that are not one integer network, e.g. MiniLM): the float input quantized
    with the calibrated input scale, the integer-only matmul and requantization to the
    calibrated output scale, the output codes (int16 by default:
    ``IntegerOnlyConfig.layers_out_bits``) dequantized. Integer-only inside the layer; the
    model around it stays float."""

    def __init__(self, quant_in: FloatBoundary, layer: IntegerLinear, dequant_out: FloatBoundary):
        super().__init__()
        self.quant_in, self.layer, self.dequant_out = quant_in, layer, dequant_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dequant_out.dequantize(self.layer(self.quant_in.quantize(x)))
        return y.to(x.dtype)


class IntegerModel(nn.Module):
    """An integer-only network (``body``: int8 codes in, int8 codes out; what
    ``qkern.quantize_model(model, IntegerOnlyConfig(), ...)`` makes of an ``nn.Sequential``)
    with its float boundary outside it: ``quantize`` (the input scale / zero point of the
    first integer layer), ``dequantize`` (the output ones of the last), ``predict(x)`` =
    ``dequantize(forward(quantize(x)))``."""

    def __init__(self, body: nn.Module):
        super().__init__()
        layers = [m for m in body.modules() if isinstance(m, _Requant)]
        if not layers:
            raise ValueError("IntegerModel needs a body with integer layers (IntegerLinear / "
                             "IntegerConv2d): convert the model with IntegerOnlyConfig first")
        self.body = body
        self.input = FloatBoundary(layers[0].in_scale, layers[0].in_zp)
        self.output = FloatBoundary(layers[-1].out_scale, layers[-1].out_zp)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.body(q)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.input.quantize(x)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return self.output.dequantize(q)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.forward(self.quantize(x)))
