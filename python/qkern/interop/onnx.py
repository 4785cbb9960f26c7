"""ONNX export with QuantizeLinear / DequantizeLinear (QDQ): the form Intel Neural Compressor,
AMD Quark and TensorRT ModelOpt hand to runtimes, for conventional models (the digits MLP / CNN,
BERT / all-MiniLM-L6-v2)::

    qkern.export(qmodel, "model.onnx", format="onnx", example_inputs=(x,))

The graph is the float model's (traced with torch's TorchScript ONNX exporter,
``dynamo=False``: no onnxscript needed) with each qkern layer written as the ONNX operators that
compute what it computes (ONNX operator spec, ``QuantizeLinear`` / ``DequantizeLinear``):

- weights: the integer codes as an initializer (int8 / uint8; int4 / uint4 for 2..4-bit formats,
  whose codes fit), their float32 scales and zero points (in code units, the codes' type) ->
  ``DequantizeLinear`` -> ``MatMul`` (+ ``Add`` of the float bias) or ``Conv``. ONNX dequantizes
  ``(q - zero_point) * scale``, qkern's rule. Per-channel scales use ``axis``; group-wise scales
  the blocked form (``block_size``, opset 21). The codes are stored transposed, (in, out),
  the layout ``MatMul`` reads and onnxruntime's MatMulNBits fusion looks for.
- static activations (``ActQuant``; the W8A8 kernels' ``act_scale``): ``QuantizeLinear`` ->
  ``DequantizeLinear`` with the calibrated scale and zero point (int8, or uint8 for unsigned
  formats). Both saturate to the code range and round half to even. qkern's W8A8 kernels keep
  activation codes in [-127, 127], so their input is first clipped to ``[-127 s, 127 s]``
  (a float ``Clip``), which gives the same codes while the Q/DQ pair stays adjacent.
- dynamic activations (``int8_dynamic`` / ``int8_token``: per row; ``int8_dynamic_tensor``):
  the scale ``max|x| / 127`` (0 -> 1) computed in the graph (``Abs``, ``ReduceMax``, ``Div``),
  then a QDQ pair with that scale (per row: the blocked form with one block per row, opset 21).

Rounding: ONNX's ``QuantizeLinear`` divides, ``round(x / scale)``; qkern multiplies by the
reciprocal, ``round(x * (1 / scale))`` (docs/numerics.md). The two agree except where the
quotient lies within a rounding error of a half-integer: such an activation gets the
neighbouring code (one step). Everything else is the same arithmetic up to float32 summation
order. Layers the format cannot express exactly (codebook / float formats, float zero points,
mid-rise codes, LLM.int8 outliers, binary activations, fast-mode activation blocks, quantized
embeddings, Hadamard rotations) are refused with their names and the reason.
"""

from __future__ import annotations

import copy
import inspect
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import QuantConv1d, QuantConv2d, QuantLinear
from ..quantization import ActQuant
from ..tensor import QTensor
from ..version import __version__
from . import Format, register

__all__ = ["BLOCKED_OPSET", "MAX_OPSET", "MIN_OPSET", "OnnxFormat", "count_ops", "twin"]

# ONNX TensorProto element types
_UINT8, _INT8, _UINT4, _INT4 = 2, 3, 21, 22
MIN_OPSET, MAX_OPSET = 13, 21
#: the first opset with blocked (group-wise) Q/DQ and 4-bit integer types
BLOCKED_OPSET = 21
_TAG = "qkern_elem_type"  # marks DequantizeLinear nodes whose int8 initializers become 4-bit
_F32_TINY = float(torch.finfo(torch.float32).tiny)
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
    if f.kind != "int":
        return (f"format {f.name} is a {f.kind} format; DequantizeLinear decodes integer codes "
                "with an affine scale only")
    if q.quantizer not in ("midtread", "deadzone"):
        return f"quantizer {q.quantizer!r} has no DequantizeLinear form ((q + 1/2) * scale)"
    if q.zero_point is not None and q.zero_point.is_floating_point():
        return "float zero points (HQQ); DequantizeLinear's zero point is an integer code"
    if f.bits > 8:
        return f"{f.bits}-bit codes (8 at most)"
    elem = (_INT4 if f.signed else _UINT4) if f.bits <= 4 else (_INT8 if f.signed else _UINT8)
    out, n_in = q.shape
    scale = q.scale.detach().float()
    group = None
    if q.granularity == "tensor":
        scale = scale.reshape(())
    elif q.granularity == "channel" and scale.numel() == out:
        scale = scale.reshape(out)
    elif q.granularity == "group" and scale.shape == (out, n_in // q.group_size):
        group = q.group_size
    else:
        return f"{q.granularity} scales of shape {tuple(scale.shape)}"
    if (group is not None or elem in (_INT4, _UINT4)) and opset < BLOCKED_OPSET:
        return (f"{'group-wise scales' if group else f'{f.bits}-bit codes'} need opset >= "
                f"{BLOCKED_OPSET} (blocked / 4-bit DequantizeLinear); opset={opset}")
    zp = None if q.zero_point is None else q.zero_point.detach().reshape(scale.shape)
    dt = torch.int8 if elem in (_INT8, _INT4) else torch.uint8
    return _Weight(q.codes.to(dt), scale, None if zp is None else zp.to(dt), elem, group)


# ---- the quantized operators, as torch functions with ONNX symbolics -----------------------


def _const(g, value: torch.Tensor):
    return g.op("Constant", value_t=value)


class _DQ(torch.autograd.Function):
    """DequantizeLinear(codes, scale, zero_point): per tensor, per ``axis`` or blocked."""

    @staticmethod
    def forward(ctx, codes, scale, zp, axis: int, block: int, elem: int):
        n = codes.dim()
        c = codes.float() if zp is None else codes.float() - _expand(zp.float(), axis, block, n)
        return c * _expand(scale, axis, block, n)

    @staticmethod
    def symbolic(g, codes, scale, zp, axis: int, block: int, elem: int):
        attrs = {"axis_i": axis}
        if block:
            attrs["block_size_i"] = block
        if elem in (_INT4, _UINT4):
            attrs[f"{_TAG}_i"] = elem  # the exporter has no 4-bit tensors: retyped afterwards
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
    """DequantizeLinear(QuantizeLinear(x, scale, zp), scale, zp), one static scale."""

    @staticmethod
    def forward(ctx, x, scale, zp, qmin: int, qmax: int):
        q = torch.clamp(torch.round(x * (1.0 / scale)) + zp.float(), qmin, qmax)
        return (q - zp.float()) * scale

    @staticmethod
    def symbolic(g, x, scale, zp, qmin: int, qmax: int):
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zp), scale, zp)


class _DynQDQ(torch.autograd.Function):
    """Symmetric int8 QDQ with the scale ``max|x| / 127`` (0 -> 1) of each row (the last
    dimension; blocked Q/DQ with one block per row) or of the whole tensor."""

    @staticmethod
    def forward(ctx, x, per_row: bool, opset: int, rank: int, k: int):
        amax = x.abs().amax(-1, keepdim=True) if per_row else x.abs().amax()
        s = amax / 127.0
        s = torch.where(amax > 0, s.clamp_min(_F32_TINY) if per_row else s, torch.ones_like(s))
        return torch.clamp(torch.round(x * (1.0 / s)), -127, 127) * s

    @staticmethod
    def symbolic(g, x, per_row: bool, opset: int, rank: int, k: int):
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
        if not per_row:
            zp = _const(g, torch.tensor(0, dtype=torch.int8))
            return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, zp), s, zp)
        blocked = {"axis_i": rank - 1, "block_size_i": k}
        q = g.op("QuantizeLinear", x, s, output_dtype_i=_INT8, **blocked)
        return g.op("DequantizeLinear", q, s, **blocked)


class _StaticAct(nn.Module):
    """QDQ of an activation with a calibrated per-tensor scale; ``clip``: W8A8's [-127, 127]."""

    def __init__(self, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int, clip: bool):
        super().__init__()
        self.qmin, self.qmax = qmin, qmax
        self.register_buffer("scale", scale.detach().float().reshape(()).clone())
        self.register_buffer("zero_point", zp.reshape(()).clone())
        self.register_buffer("bound", (127.0 * self.scale).reshape(()) if clip else None)

    def forward(self, x):
        if self.bound is not None:
            x = torch.clamp(x, -self.bound, self.bound)
        return _QDQ.apply(x, self.scale, self.zero_point, self.qmin, self.qmax)


class _DynamicAct(nn.Module):
    def __init__(self, per_row: bool, opset: int):
        super().__init__()
        self.per_row, self.opset = per_row, opset

    def forward(self, x):
        return _DynQDQ.apply(x, self.per_row, self.opset, x.dim(), int(x.shape[-1]))


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
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.act = act

    def forward(self, x):
        if self.act is not None:
            x = self.act(x)
        w = _DQ.apply(self.codes, self.scale, self.zero_point, self.axis, self.block, self.elem)
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
        bias = conv.qlinear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.act = act

    def forward(self, x):
        if self.act is not None:
            x = self.act(x)
        w = _DQ.apply(self.codes, self.scale, self.zero_point, 1 if self.block else 0,
                      self.block, self.elem)
        if self.block:
            w = w.reshape(self.shape)
        conv = F.conv1d if self.ndim == 1 else F.conv2d
        return conv(x, w, self.bias, self.stride, self.padding, self.dilation)


# ---- the twin: every qkern layer replaced by its ONNX-exportable form ----------------------


def _act_of_layer(ql: QuantLinear, opset: int, conv: bool) -> nn.Module | None | str:
    if ql.mode != "exact":
        return f"mode={ql.mode!r} (activations quantized in blocks of 32 inside the kernel)"
    if ql.act == "none":
        return None
    if ql.act == "int8_static":
        return _StaticAct(ql.act_scale, torch.zeros((), dtype=torch.int8), -128, 127, True)
    if conv:
        return f"act={ql.act!r} on a convolution (its im2col rows have no Conv-input form)"
    if ql.act in ("int8_dynamic", "int8_token"):
        if opset < BLOCKED_OPSET:
            return f"act={ql.act!r} (per-row scales) needs opset >= {BLOCKED_OPSET}"
        return _DynamicAct(True, opset)
    if ql.act == "int8_dynamic_tensor":
        return _DynamicAct(False, opset)
    return f"act={ql.act!r} has no QDQ form"


def _act_of_actquant(m: ActQuant) -> nn.Module | str:
    from_fmt = _fmt_range(m.fmt)
    if isinstance(from_fmt, str):
        return from_fmt
    dt, qmin, qmax = from_fmt
    zp = torch.zeros((), dtype=dt) if m.zero_point is None else m.zero_point.to(dt)
    return _StaticAct(m.scale, zp, qmin, qmax, False)


def _fmt_range(name: str) -> tuple[torch.dtype, int, int] | str:
    if name == "int8":
        return torch.int8, -128, 127
    if name == "uint8":
        return torch.uint8, 0, 255
    return f"activation format {name}: only int8 / uint8 activations are exported"


def _swap(mod: nn.Module, name: str, opset: int, bad: list[str]) -> nn.Module:
    """The ONNX-exportable twin of ``mod`` (in place on a copy); reasons collected in bad."""
    if isinstance(mod, ActQuant):
        act = _act_of_actquant(mod)
        inner = _swap(mod.module, f"{name}.module", opset, bad)
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
        act = _act_of_layer(ql, opset, is_conv)
        why = [r for r in (w, act) if isinstance(r, str)]
        if why:
            bad.extend(f"{name}: {r}" for r in why)
            return mod
        return _Conv(mod, w, act) if is_conv else _Linear(w, ql.bias, act)
    if type(mod).__module__.startswith(_QKERN_MODULES):
        bad.append(f"{name}: {type(mod).__name__} has no ONNX QDQ export")
        return mod
    for child_name, child in list(mod.named_children()):
        new = _swap(child, f"{name}.{child_name}" if name else child_name, opset, bad)
        if new is not child:
            setattr(mod, child_name, new)
    return mod


def _has_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, ActQuant)) for m in model.modules())


def twin(model: nn.Module, opset: int = MAX_OPSET) -> nn.Module:
    """A copy of ``model`` with every qkern layer replaced by the torch functions whose ONNX
    export is its QDQ form; ValueError naming every layer that has none."""
    if not _has_quantized(model):
        raise ValueError("onnx export: the model has no quantized layers (QuantLinear, "
                         "QuantConv, ActQuant); quantize it first (qkern.quantize_model)")
    bad: list[str] = []
    out = _swap(copy.deepcopy(model), "", opset, bad)
    if bad:
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        raise ValueError("onnx export cannot express these layers exactly:\n  "
                         + "\n  ".join(bad[:8]) + more)
    return out.eval()


# ---- export ---------------------------------------------------------------------------------


def _inputs(model: nn.Module, example_inputs) -> tuple[tuple[torch.Tensor, ...], list[str]]:
    """(positional args, their names) from a tensor, a tuple / list, or a dict by the
    parameter names of ``model.forward``."""
    params = [p.name for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if example_inputs is None:
        raise ValueError("onnx export traces the model: pass example_inputs= (a tensor, a "
                         "tuple of tensors, or a dict of named tensors)")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        unknown = [k for k in example_inputs if k not in params]
        if unknown:
            raise ValueError(f"example_inputs: {unknown} are not parameters of "
                             f"{type(model).__name__}.forward {params}")
        n = max(params.index(k) for k in example_inputs) + 1
        missing = [p for p in params[:n] if p not in example_inputs]
        if missing:
            raise ValueError(f"example_inputs: give {missing} too (inputs are passed by "
                             "position, in the order of forward's parameters)")
        example_inputs = tuple(example_inputs[p] for p in params[:n])
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise TypeError("example_inputs must be a tensor, a non-empty tuple / list of tensors "
                        f"or a dict of tensors, got {type(example_inputs).__name__}")
    bad = [type(t).__name__ for t in example_inputs if not isinstance(t, torch.Tensor)]
    if bad:
        raise TypeError(f"example_inputs must all be tensors, got {bad}")
    if len(example_inputs) > len(params):
        raise ValueError(f"{len(example_inputs)} example inputs for forward{tuple(params)}")
    return tuple(example_inputs), params[:len(example_inputs)]


def _dynamic_axes(args, names, out_names, outputs) -> dict[str, dict[int, str]]:
    """Default: dim 0 of every input and output is "batch"; integer inputs of rank 2 (token
    ids, masks) and outputs of rank >= 3 next to them also get dim 1 "sequence"."""
    axes: dict[str, dict[int, str]] = {}
    seq = False
    for n, t in zip(names, args):
        axes[n] = {0: "batch"} if t.dim() else {}
        if t.dim() == 2 and not t.is_floating_point():
            axes[n][1], seq = "sequence", True
    for n, t in zip(out_names, outputs):
        axes[n] = {0: "batch"} if t.dim() else {}
        if seq and t.dim() >= 3:
            axes[n][1] = "sequence"
    return axes


def _retype_4bit(model) -> None:
    """The int8 initializers of DequantizeLinear nodes marked 4-bit become INT4 / UINT4 (the
    same values; onnx packs two per byte); the marks are removed."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done: set[str] = set()
    for node in model.graph.node:
        marks = [a for a in node.attribute if a.name == _TAG]
        if node.op_type != "DequantizeLinear" or not marks:
            continue
        elem = marks[0].i
        node.attribute.remove(marks[0])
        for i in (0, 2):
            if i >= len(node.input) or node.input[i] in done:
                continue
            t = inits.get(node.input[i])
            if t is None:
                raise RuntimeError(f"onnx export: {node.input[i]!r} of {node.name} is not an "
                                   "initializer (cannot store it as 4-bit)")
            a = numpy_helper.to_array(t)
            t.CopyFrom(helper.make_tensor(t.name, elem, a.shape, a.reshape(-1).tolist()))
            done.add(t.name)


def count_ops(model) -> dict[str, int]:
    """How many nodes of each operator type an ONNX graph (ModelProto) has."""
    out: dict[str, int] = {}
    for node in model.graph.node:
        out[node.op_type] = out.get(node.op_type, 0) + 1
    return dict(sorted(out.items()))


@register
class OnnxFormat(Format):
    """``qkern.export(model, "model.onnx", format="onnx", example_inputs=..., opset=21,
    input_names=None, output_names=None, dynamic_axes=None, overwrite=False)``: one ``.onnx``
    file, written atomically, checked with ``onnx.checker`` (full check) before it is."""

    name = "onnx"

    def write(self, model: nn.Module, out: Path, example_inputs=None, opset: int = MAX_OPSET,
              input_names: list[str] | None = None, output_names: list[str] | None = None,
              dynamic_axes: dict | None = None, overwrite: bool = False) -> Path:
        try:
            import onnx
        except ImportError as e:
            raise ImportError("ONNX export needs the onnx package (pip install onnx)") from e
        if isinstance(opset, bool) or not isinstance(opset, int) \
                or not MIN_OPSET <= opset <= MAX_OPSET:
            raise ValueError(f"opset must be an int in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")
        out = Path(out)
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
        if out.is_dir():
            raise IsADirectoryError(f"{out} is a directory; give a file name (model.onnx)")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"{out.parent} is not a directory")
        args, names = _inputs(model, example_inputs)
        tw = twin(model, opset)
        with torch.no_grad():
            res = tw(*args)
        outputs = res if isinstance(res, (tuple, list)) else (res,)
        if input_names is not None:
            names = list(input_names)
        if output_names is None:
            output_names = (["output"] if len(outputs) == 1
                            else [f"output_{i}" for i in range(len(outputs))])
        if dynamic_axes is None:
            dynamic_axes = _dynamic_axes(args, names, output_names, outputs)
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings of input checks; dynamo=False
            torch.onnx.export(tw, args, buf, dynamo=False, opset_version=opset,
                              input_names=names, output_names=list(output_names),
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        proto = onnx.load_from_string(buf.getvalue())
        _retype_4bit(proto)
        proto.producer_name, proto.producer_version = "qkern", __version__
        proto.doc_string = (f"{type(model).__name__} quantized with qkern, QDQ form "
                            "(QuantizeLinear / DequantizeLinear)")
        onnx.checker.check_model(proto, full_check=True)
        data = proto.SerializeToString()
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".qkern-tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
