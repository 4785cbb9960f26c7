"""ONNX export with QuantizeLinear / DequantizeLinear (QDQ): the form Intel Neural Compressor,
AMD Quark and TensorRT ModelOpt hand to runtimes, for conventional models (the digits MLP / CNN,
BERT / all-MiniLM-L6-v2)::

    qkern.export(qmodel, "model.onnx", format="onnx", example_inputs=(x,))

The graph is the float model's (traced with torch's TorchScript ONNX exporter,
``dynamo=False``: no onnxscript needed) with each qkern layer written as the ONNX operators that
compute what it computes (ONNX operator spec, ``QuantizeLinear`` / ``DequantizeLinear``):

- weights: the integer codes as an initializer (int8 / uint8; int4 / uint4 for 2..4-bit formats,
  whose codes fit; FLOAT8E4M3FN / FLOAT8E5M2 bytes for qkern's fp8 / mxfp8 formats), their
  float32 scales and zero points (in code units, the codes' type) -> ``DequantizeLinear`` ->
  ``MatMul`` (+ ``Add`` of the float bias), ``Conv`` or ``Gather`` (quantized embeddings).
  ONNX dequantizes ``(q - zero_point) * scale``, qkern's rule. Per-channel scales use
  ``axis``; group-wise scales the blocked form (``block_size``, opset 21). The codes are stored
  transposed, (in, out), the layout ``MatMul`` reads and onnxruntime's MatMulNBits fusion looks
  for.
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
neighbouring code (one step); ``rounding="qkern"`` writes ``QuantizeLinear(x * (1/s), 1)``
instead, qkern's codes bit for bit. Everything else is the same arithmetic up to float32
summation order. Layers the format cannot express exactly (codebook formats other than float8,
float zero points, mid-rise codes, LLM.int8 outliers, binary activations, fast-mode activation
blocks, dynamic activations on convolutions, Hadamard rotations) are refused with their names
and the reason. docs/serving/onnx.md: examples, onnxruntime's session options, measured agreement.
"""

from __future__ import annotations

import inspect
import io
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from ..version import __version__
from . import Format, register
from .qdq import ELEM_TAG, FLOAT8, MAX_OPSET, MIN_OPSET, twin

__all__ = ["OnnxFormat", "count_ops", "twin"]

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


def _retype(model) -> None:
    """The int8 / uint8 initializers of DequantizeLinear nodes marked 4-bit or float8 become
    INT4 / UINT4 (the same values; onnx packs two per byte) or FLOAT8E4M3FN / FLOAT8E5M2 (the
    same bytes); the marks are removed. An initializer the exporter shared with a node that
    needs it as it is gets a retyped copy instead."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    _skip_identities(model, set(inits))
    want: dict[tuple[int, int], int] = {}  # (node index, input index) -> element type
    for k, node in enumerate(model.graph.node):
        marks = [a for a in node.attribute if a.name == ELEM_TAG]
        if marks:
            node.attribute.remove(marks[0])
            want.update({(k, i): marks[0].i for i in (0, 2) if i < len(node.input)})
    users: dict[str, set[int | None]] = {}
    for k, node in enumerate(model.graph.node):
        for i, name in enumerate(node.input):
            users.setdefault(name, set()).add(want.get((k, i)))
    made: dict[tuple[str, int], str] = {}
    for (k, i), elem in want.items():
        node = model.graph.node[k]
        name = node.input[i]
        t = inits.get(name)
        if t is None:
            raise RuntimeError(f"onnx export: {name!r} of {node.name} is not an initializer "
                               "(cannot retype it)")
        if (name, elem) not in made:
            a = numpy_helper.to_array(t)
            own = users[name] == {elem}
            new_name = name if own else f"{name}__{elem}"
            if elem in FLOAT8:
                new = onnx.TensorProto(name=new_name, data_type=elem, dims=a.shape,
                                       raw_data=a.astype("uint8").tobytes())
            else:
                new = helper.make_tensor(new_name, elem, a.shape, a.reshape(-1).tolist())
            if own:
                t.CopyFrom(new)
            else:
                model.graph.initializer.append(new)
            made[(name, elem)] = new_name
        node.input[i] = made[(name, elem)]


def _skip_identities(model, inits: set[str]) -> None:
    """Consumers of ``Identity(initializer)`` (how the exporter shares equal constants) read
    the initializer itself; those Identity nodes go."""
    outputs = {o.name for o in model.graph.output}
    alias = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def count_ops(model) -> dict[str, int]:
    """How many nodes of each operator type an ONNX graph (ModelProto) has."""
    out: dict[str, int] = {}
    for node in model.graph.node:
        out[node.op_type] = out.get(node.op_type, 0) + 1
    return dict(sorted(out.items()))


@register
class OnnxFormat(Format):
    """``qkern.export(model, "model.onnx", format="onnx", example_inputs=..., opset=21,
    input_names=None, output_names=None, dynamic_axes=None, rounding="onnx",
    overwrite=False)``: one ``.onnx`` file, written atomically, checked with ``onnx.checker``
    (full check) before it is. ``example_inputs``: what ``model`` is traced with (a tensor, a
    tuple, or a dict by ``forward``'s parameter names); ``dynamic_axes``: torch's (default: dim
    0 of every input and output, and dim 1 of 2-D integer inputs); ``rounding``: "onnx" (the
    standard QDQ pair) or "qkern" (``QuantizeLinear(x * (1/s), 1)``: qkern's codes bit for
    bit)."""

    name = "onnx"

    def write(self, model: nn.Module, out: Path, example_inputs=None, opset: int = MAX_OPSET,
              input_names: list[str] | None = None, output_names: list[str] | None = None,
              dynamic_axes: dict | None = None, rounding: str = "onnx",
              overwrite: bool = False) -> Path:
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
        tw = twin(model, opset, rounding)
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
            try:
                torch.onnx.export(tw, args, buf, dynamo=False, opset_version=opset,
                                  input_names=names, output_names=list(output_names),
                                  dynamic_axes=dynamic_axes, do_constant_folding=True)
            except Exception as e:  # an op of the float part the exporter cannot write
                raise RuntimeError(f"onnx export: torch.onnx.export (TorchScript exporter, "
                                   f"opset {opset}) failed on {type(model).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                   ) from e
        proto = onnx.load_from_string(buf.getvalue())
        _retype(proto)
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
