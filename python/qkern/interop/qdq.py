"""The QDQ twin of a qkern model: a copy in which every qkern layer is replaced by torch
functions whose TorchScript ONNX export (``torch.onnx.export(..., dynamo=False)``) is its
QuantizeLinear / DequantizeLinear form (ONNX operator spec), and whose torch forward computes
the same values (qkern's reciprocal rounding). ``interop/onnx.py`` exports it; the module
docstring there states what each layer becomes and what is refused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear
from ..packing import unpack_bits
from ..quantization import ActQuant
from ..tensor import QTensor

__all__ = ["BLOCKED_OPSET", "ELEM_TAG", "FLOAT8", "MAX_OPSET", "MIN_OPSET", "RETYPED", "ROUNDINGS",
           "embedding_weight", "twin"]

# ONNX TensorProto element types
_UINT8, _INT8, _UINT4, _INT4 = 2, 3, 21, 22
#: ONNX float8 element types (opset 19) and their torch dtypes: a codebook format whose table is
#: exactly one of them (qkern's fp8_e4m3, mxfp8_e4m3: E4M3FN; fp8_e5m2: E5M2) is exported as
#: such codes (the same bytes)
FLOAT8 = {17: torch.float8_e4m3fn, 19: torch.float8_e5m2}
#: element types the exporter retypes after tracing (torch writes them as int8 / uint8)
RETYPED = (_INT4, _UINT4, *FLOAT8)
_F8_VALUES = {e: torch.arange(256, dtype=torch.uint8).view(dt).float() for e, dt in FLOAT8.items()}
MIN_OPSET, MAX_OPSET = 13, 21
#: the first opset with blocked (group-wise) Q/DQ and 4-bit integer types
BLOCKED_OPSET = 21
ELEM_TAG = "qkern_elem_type"  # marks DequantizeLinear nodes whose initializers get retyped
_F32_TINY = float(torch.finfo(torch.float32).tiny)
ROUNDINGS = ("onnx", "qkern")
_QKERN_MODULES = ("qkern.nn", "qkern.quantization")


@dataclass
class _Weight:
    """A weight for DequantizeLinear: codes (out, in) (int8 / uint8 tensors holding the values),
    float32 scale ((), (out,), or (out, in // group)), zero point like scale or None."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    elem: int
    group: int | None


def _weight(q: QTensor, opset: int) -> _Weight | str:
    """The DequantizeLinear form of a quantized weight, or why there is none."""
    f = q.format
    fp8 = _float8(f)
    if f.kind != "int" and fp8 is None:
        return (f"format {f.name} is a {f.kind} format (a table of values); DequantizeLinear "
                "decodes integer or float8 codes with an affine scale only")
    if q.quantizer not in ("midtread", "deadzone"):
        return f"quantizer {q.quantizer!r} has no DequantizeLinear form ((q + 1/2) * scale)"
    if q.zero_point is not None and q.zero_point.is_floating_point():
        return "float zero points (HQQ); DequantizeLinear's zero point is an integer code"
    if f.bits > 8:
        return f"{f.bits}-bit codes (8 at most)"
    elem = (_INT4 if f.signed else _UINT4) if f.bits <= 4 else (_INT8 if f.signed else _UINT8)
    if fp8 is not None:
        elem = fp8
        if opset < 19:
            return f"float8 codes need opset >= 19; opset={opset}"
    out, n_in = q.shape
    scale = q.scale.detach().float()
    group = None
    if q.granularity == "tensor":
        scale = scale.reshape(())
    elif q.granularity == "channel" and q.axis == 0 and scale.numel() == out:
        scale = scale.reshape(out)
    elif (q.granularity == "group" and q.axis == 1
          and scale.shape == (out, n_in // q.group_size)):
        group = q.group_size
    else:
        return f"{q.granularity} scales along axis {q.axis}, of shape {tuple(scale.shape)}"
    if (group is not None or elem in (_INT4, _UINT4)) and opset < BLOCKED_OPSET:
        return (f"{'group-wise scales' if group else f'{f.bits}-bit codes'} need opset >= "
                f"{BLOCKED_OPSET} (blocked / 4-bit DequantizeLinear); opset={opset}")
    zp = None if q.zero_point is None else q.zero_point.detach().reshape(scale.shape)
    dt = torch.int8 if elem in (_INT8, _INT4) else torch.uint8  # float8: the code bytes
    return _Weight(q.codes.to(dt), scale, None if zp is None else zp.to(dt), elem, group)


# ---- the quantized operators, as torch functions with ONNX symbolics -----------------------


def _float8(f) -> int | None:
    """The ONNX float8 type whose values are exactly the table of codebook format ``f``."""
    if f.kind != "codebook" or f.bits != 8 or f.table is None:
        return None
    table = f.values
    for elem, v in _F8_VALUES.items():
        fin = torch.isfinite(table)
        if torch.equal(fin, torch.isfinite(v)) and torch.equal(table[fin], v[fin]):
            return elem
    return None


def _const(g, value: torch.Tensor):
    return g.op("Constant", value_t=value)


def _dequantize(codes, scale, zp, values, axis: int, block: int) -> torch.Tensor:
    n = codes.dim()
    if values is not None:  # float8: the value of each code byte
        codes = values[codes.long()]
    c = codes.float() if zp is None else codes.float() - _expand(zp.float(), axis, block, n)
    return c * _expand(scale, axis, block, n)


class _DQ(torch.autograd.Function):
    """DequantizeLinear(codes, scale, zero_point): per tensor, per ``axis`` or blocked.
    Backward: the exact derivative with respect to a float ``scale`` (the codes are integers);
    none for the zero point."""

    @staticmethod
    def forward(ctx, codes, scale, zp, values, axis: int, block: int, elem: int):
        ctx.save_for_backward(codes, scale, zp, values)
        ctx.axis, ctx.block = axis, block
        return _dequantize(codes, scale, zp, values, axis, block)

    @staticmethod
    def backward(ctx, g):
        codes, scale, zp, values = ctx.saved_tensors
        gs = None
        if ctx.needs_input_grad[1]:
            with torch.enable_grad():
                s = scale.detach().requires_grad_()
                y = _dequantize(codes, s, zp, values, ctx.axis, ctx.block)
                (gs,) = torch.autograd.grad(y, s, g)
        return None, gs, None, None, None, None, None

    @staticmethod
    def symbolic(g, codes, scale, zp, values, axis: int, block: int, elem: int):
        attrs = {"axis_i": axis}
        if block:
            attrs["block_size_i"] = block
        if elem in RETYPED:  # the exporter has no 4-bit / float8 tensors: retyped afterwards
            attrs[f"{ELEM_TAG}_i"] = elem
        ins = [codes, scale] if zp is None else [codes, scale, zp]
        return g.op("DequantizeLinear", *ins, **attrs)


def _expand(t: torch.Tensor, axis: int, block: int, ndim: int) -> torch.Tensor:
    """A scale / zero point (scalar, 1-D along ``axis``, or blocked) broadcast against codes
    of ``ndim`` dimensions."""
    if t.dim() == 0:
        return t
    if block:
        return t.repeat_interleave(block, dim=axis)
    return t.reshape([-1 if i == axis else 1 for i in range(ndim)])


class _QDQ(torch.autograd.Function):
    """DequantizeLinear(QuantizeLinear(x, scale, zp), scale, zp), one static scale.
    Backward: the clipped straight-through estimator of ``qkern.fake_quantize`` (the gradient
    of x passes where ``x / scale + zp`` lies in ``[qmin - 1/2, qmax + 1/2]``, 0 elsewhere);
    scale and zero point are data (no gradient)."""

    @staticmethod
    def forward(ctx, x, scale, zp, qmin: int, qmax: int, recip: bool):
        t = x * (1.0 / scale) + zp.float()
        ctx.save_for_backward((t >= qmin - 0.5) & (t <= qmax + 0.5))
        q = torch.clamp(torch.round(x * (1.0 / scale)) + zp.float(), qmin, qmax)
        return (q - zp.float()) * scale

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, g, torch.zeros_like(g)), None, None, None, None, None

    @staticmethod
    def symbolic(g, x, scale, zp, qmin: int, qmax: int, recip: bool):
        if recip:
            x, q_scale = _times_reciprocal(g, x, scale)
        else:
            q_scale = scale
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, q_scale, zp), scale, zp)


def _times_reciprocal(g, x, scale):
    """(x * float32(1 / scale), 1.0): qkern's quantize step, ``rne(x * (1/s))``, for a
    QuantizeLinear of scale 1 (whose division by 1 is exact)."""
    r = g.op("Div", _const(g, torch.tensor(1.0)), scale)
    return g.op("Mul", x, r), _const(g, torch.tensor(1.0))


class _DynQDQ(torch.autograd.Function):
    """Symmetric int8 QDQ with the scale ``max|x| / 127`` (0 -> 1) of each row (the last
    dimension; blocked Q/DQ with one block per row) or of the whole tensor. Backward: the
    straight-through estimator with the scale a constant (nothing clamps: every ``|x|`` is at
    most ``127 scale``), so the gradient passes unchanged."""

    @staticmethod
    def backward(ctx, g):
        return g, None, None, None, None, None

    @staticmethod
    def forward(ctx, x, per_row: bool, opset: int, rank: int, k: int, recip: bool):
        amax = x.abs().amax(-1, keepdim=True) if per_row else x.abs().amax()
        s = amax / 127.0
        s = torch.where(amax > 0, s.clamp_min(_F32_TINY) if per_row else s, torch.ones_like(s))
        return torch.clamp(torch.round(x * (1.0 / s)), -127, 127) * s

    @staticmethod
    def symbolic(g, x, per_row: bool, opset: int, rank: int, k: int, recip: bool):
        a = g.op("Abs", x)
        if not per_row:
            amax = g.op("ReduceMax", a, keepdims_i=0)
        elif opset >= 18:
            amax = g.op("ReduceMax", a, _const(g, torch.tensor([-1])), keepdims_i=1)
        else:
            amax = g.op("ReduceMax", a, axes_i=[-1], keepdims_i=1)
        s = g.op("Div", amax, _const(g, torch.tensor(127.0)))
        if per_row:
            s = g.op("Max", s, _const(g, torch.tensor(_F32_TINY)))
        zero = g.op("Equal", amax, _const(g, torch.tensor(0.0)))
        s = g.op("Where", zero, _const(g, torch.tensor(1.0)), s)
        zp = _const(g, torch.tensor(0, dtype=torch.int8))
        if not per_row:
            q_x, q_s = _times_reciprocal(g, x, s) if recip else (x, s)
            return g.op("DequantizeLinear", g.op("QuantizeLinear", q_x, q_s, zp), s, zp)
        if recip:  # Q / DQ of scale 1, times the per-row scales (a blocked DQ here breaks
            #      onnxruntime's int8 -> uint8 rewrite of the default session)
            x1, one = _times_reciprocal(g, x, s)
            q = g.op("QuantizeLinear", x1, one, zp)
            return g.op("Mul", g.op("DequantizeLinear", q, one, zp), s)
        blocked = {"axis_i": rank - 1, "block_size_i": k}
        q = g.op("QuantizeLinear", x, s, output_dtype_i=_INT8, **blocked)
        return g.op("DequantizeLinear", q, s, **blocked)


class _StaticAct(nn.Module):
    """QDQ of an activation with a calibrated per-tensor scale; ``clip``: W8A8's [-127, 127]."""

    def __init__(self, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int, clip: bool,
                 recip: bool):
        super().__init__()
        self.qmin, self.qmax, self.recip = qmin, qmax, recip
        self.register_buffer("scale", scale.detach().float().reshape(()).clone())
        self.register_buffer("zero_point", zp.reshape(()).clone())
        self.register_buffer("bound", (127.0 * self.scale).reshape(()) if clip else None)

    def forward(self, x):
        if self.bound is not None:
            x = torch.clamp(x, -self.bound, self.bound)
        return _QDQ.apply(x, self.scale, self.zero_point, self.qmin, self.qmax, self.recip)


class _DynamicAct(nn.Module):
    def __init__(self, per_row: bool, opset: int, recip: bool):
        super().__init__()
        self.per_row, self.opset, self.recip = per_row, opset, recip

    def forward(self, x):
        return _DynQDQ.apply(x, self.per_row, self.opset, x.dim(), int(x.shape[-1]), self.recip)


class _WithAct(nn.Module):
    """``ActQuant``'s twin: the activation QDQ, then the (twin of the) wrapped module."""

    def __init__(self, act: nn.Module, module: nn.Module):
        super().__init__()
        self.act, self.module = act, module

    def forward(self, x, *args, **kwargs):
        return self.module(self.act(x), *args, **kwargs)


class _Linear(nn.Module):
    """``MatMul(x, DequantizeLinear(W^T codes)) + bias`` after the layer's activation QDQ."""

    def __init__(self, w: _Weight, bias: torch.Tensor | None, act: nn.Module | None):
        super().__init__()
        grouped = w.group is not None
        self.axis, self.block, self.elem = (0 if grouped else 1), (w.group or 0), w.elem
        t = (lambda v: None if v is None else v.t().contiguous()) if grouped else (lambda v: v)
        self.register_buffer("codes", w.codes.t().contiguous())
        self.register_buffer("scale", t(w.scale))
        self.register_buffer("zero_point", t(w.zero_point))
        self.register_buffer("values", _F8_VALUES.get(w.elem), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.act = act

    def forward(self, x):
        if self.act is not None:
            x = self.act(x)
        w = _DQ.apply(self.codes, self.scale, self.zero_point, self.values, self.axis,
                      self.block, self.elem)
        y = torch.matmul(x, w)
        return y if self.bias is None else y + self.bias


class _Conv(nn.Module):
    """``Conv(x, DequantizeLinear(codes))``: per-channel codes (out, in, *k) on axis 0, or
    group-wise codes (out, in * prod(k)) dequantized blocked, then reshaped."""

    def __init__(self, conv: QuantConv1d | QuantConv2d, w: _Weight, act: nn.Module | None):
        super().__init__()
        shape = (conv.out_channels, conv.in_channels, *conv.kernel_size)
        self.shape, self.ndim = shape, len(conv.kernel_size)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.block, self.elem = w.group or 0, w.elem
        self.register_buffer("codes", w.codes if w.group else w.codes.reshape(shape))
        self.register_buffer("scale", w.scale)
        self.register_buffer("zero_point", w.zero_point)
        self.register_buffer("values", _F8_VALUES.get(w.elem), persistent=False)
        bias = conv.qlinear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.act = act

    def forward(self, x):
        if self.act is not None:
            x = self.act(x)
        w = _DQ.apply(self.codes, self.scale, self.zero_point, self.values, 1 if self.block else 0,
                      self.block, self.elem)
        if self.block:
            w = w.reshape(self.shape)
        conv = F.conv1d if self.ndim == 1 else F.conv2d
        return conv(x, w, self.bias, self.stride, self.padding, self.dilation)


class _Embedding(nn.Module):
    """``Gather(DequantizeLinear(codes), ids)``: rows per row (``axis=0``) or blocked along the
    embedding dimension."""

    def __init__(self, w: _Weight):
        super().__init__()
        self.axis, self.block, self.elem = (1, w.group, w.elem) if w.group else (0, 0, w.elem)
        self.register_buffer("codes", w.codes)
        self.register_buffer("scale", w.scale)
        self.register_buffer("zero_point", w.zero_point)
        self.register_buffer("values", _F8_VALUES.get(w.elem), persistent=False)

    def forward(self, ids):
        w = _DQ.apply(self.codes, self.scale, self.zero_point, self.values, self.axis,
                      self.block, self.elem)
        return F.embedding(ids, w)


def embedding_weight(m: QuantEmbedding) -> QTensor:
    """A QuantEmbedding's table as a QTensor, read from its public buffers (``codes_packed``:
    the codes bit-packed row by row, integer codes stored as ``code - qmin``)."""
    q, f = m.weight_q, m.weight_q.format
    n, d = m.num_embeddings, m.embedding_dim
    codes = unpack_bits(m.codes_packed.reshape(-1), f.bits, n * d).view(n, d)
    if f.kind == "int":
        codes = (codes.to(torch.int16) + f.qmin).to(torch.int8 if f.signed else torch.uint8)
    zp = m.zero_point
    return replace(q, codes=codes, scale=m.scale.reshape(q.layout.scale_shape),
                   zero_point=None if zp is None else zp.reshape(q.layout.scale_shape))


# ---- the twin: every qkern layer replaced by its ONNX-exportable form ----------------------


def _act_of_layer(ql: QuantLinear, opset: int, conv: bool, recip: bool
                  ) -> nn.Module | None | str:
    if ql.mode != "exact":
        return f"mode={ql.mode!r} (activations quantized in blocks of 32 inside the kernel)"
    if ql.act == "none":
        return None
    if ql.act == "int8_static":
        return _StaticAct(ql.act_scale, torch.zeros((), dtype=torch.int8), -128, 127, True,
                          recip)
    if conv:
        return f"act={ql.act!r} on a convolution (its im2col rows have no Conv-input form)"
    if ql.act in ("int8_dynamic", "int8_token"):
        if opset < BLOCKED_OPSET:
            return f"act={ql.act!r} (per-row scales) needs opset >= {BLOCKED_OPSET}"
        return _DynamicAct(True, opset, recip)
    if ql.act == "int8_dynamic_tensor":
        return _DynamicAct(False, opset, recip)
    why = {"int8_mixed": "LLM.int8 computes the outlier columns of each call in float",
           "binary": "XNOR sign activations are not an affine quantization"}
    return f"act={ql.act!r} has no QDQ form ({why.get(ql.act, 'unknown activation mode')})"


def _act_of_actquant(m: ActQuant, recip: bool) -> nn.Module | str:
    if m.offset is not None:
        return ("a float activation offset (LSQ+) has no QDQ form: ONNX zero points are "
                "integers")
    from_fmt = _fmt_range(m.fmt)
    if isinstance(from_fmt, str):
        return from_fmt
    dt, qmin, qmax = from_fmt
    zp = torch.zeros((), dtype=dt) if m.zero_point is None else m.zero_point.to(dt)
    return _StaticAct(m.scale, zp, qmin, qmax, False, recip)


def _fmt_range(name: str) -> tuple[torch.dtype, int, int] | str:
    if name == "int8":
        return torch.int8, -128, 127
    if name == "uint8":
        return torch.uint8, 0, 255
    return f"activation format {name}: only int8 / uint8 activations are exported"


def _swap(mod: nn.Module, name: str, opset: int, recip: bool, bad: list[str]) -> nn.Module:
    """The ONNX-exportable twin of ``mod`` (in place on a copy); reasons collected in bad."""
    if isinstance(mod, ActQuant):
        act = _act_of_actquant(mod, recip)
        inner = _swap(mod.module, f"{name}.module", opset, recip, bad)
        if isinstance(act, str):
            bad.append(f"{name}: {act}")
            return mod
        return _WithAct(act, inner)
    if isinstance(mod, (QuantLinear, QuantConv1d, QuantConv2d)):
        is_conv = not isinstance(mod, QuantLinear)
        ql = mod.qlinear if is_conv else mod
        try:
            w = _weight(ql.quantized_weight(), opset)
        except NotImplementedError as e:
            w = str(e)
        act = _act_of_layer(ql, opset, is_conv, recip)
        why = [r for r in (w, act) if isinstance(r, str)]
        if why:
            bad.extend(f"{name}: {r}" for r in why)
            return mod
        return _Conv(mod, w, act) if is_conv else _Linear(w, ql.bias, act)
    if isinstance(mod, QuantEmbedding):
        w = _weight(embedding_weight(mod), opset)
        if isinstance(w, str):
            bad.append(f"{name}: {w}")
            return mod
        return _Embedding(w)
    if type(mod).__module__.startswith(_QKERN_MODULES):
        bad.append(f"{name}: {type(mod).__name__} has no ONNX QDQ export")
        return mod
    for child_name, child in list(mod.named_children()):
        new = _swap(child, f"{name}.{child_name}" if name else child_name, opset, recip, bad)
        if new is not child:
            setattr(mod, child_name, new)
    return mod


def _has_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, ActQuant, QuantEmbedding)) for m in model.modules())


def twin(model: nn.Module, opset: int = MAX_OPSET, rounding: str = "onnx") -> nn.Module:
    """A copy of ``model`` with every qkern layer replaced by the torch functions whose ONNX
    export is its QDQ form; ValueError naming every layer that has none. ``rounding``: "onnx"
    (``QuantizeLinear(x, s)``, which divides) or "qkern" (``QuantizeLinear(x * (1/s), 1)``,
    qkern's codes bit for bit; the DequantizeLinear keeps ``s``)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if not _has_quantized(model):
        raise ValueError("onnx export: the model has no quantized layers (QuantLinear, "
                         "QuantConv, ActQuant); quantize it first (qkern.quantize_model)")
    bad = [f"{n}: {t.dtype} (the QDQ graph computes in float32: export model.float())"
           for n, t in [*model.named_parameters(), *model.named_buffers()]
           if t.is_floating_point() and t.dtype != torch.float32]
    out = _swap(copy.deepcopy(model), "", opset, rounding == "qkern", bad)
    if bad:
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        raise ValueError("onnx export cannot express these layers exactly:\n  "
                         + "\n  ".join(bad[:8]) + more)
    return out.eval()
