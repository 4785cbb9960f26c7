"""Helpers of the ONNX export tests (tests/test_interop_onnx*.py): onnxruntime sessions that
also return every QuantizeLinear output, and qkern's activation codes computed in numpy from
docs/numerics.md on the inputs qkern's layers saw."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import qkern
from qkern.nn import QuantConv1d, QuantConv2d, QuantLinear
from qkern.quantization import ActQuant

AS_WRITTEN = {"session.disable_quant_qdq": "1"}
CONVS = (QuantConv1d, QuantConv2d)


def session(model: onnx.ModelProto, config: dict[str, str], extra_outputs: bool = False):
    """An onnxruntime session; ``extra_outputs``: every QuantizeLinear output is also a graph
    output (typed by onnx's shape inference)."""
    if extra_outputs:
        model = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v for v in model.graph.value_info}
        for node in model.graph.node:
            if node.op_type == "QuantizeLinear":
                model.graph.output.append(types[node.output[0]])
    so = ort.SessionOptions()
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def qkern_codes(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """The activation codes of every activation-quantizing layer of ``model`` in execution
    order (the order of the graph's QuantizeLinear nodes; a QuantLinear's act once per layer),
    computed in numpy from docs/numerics.md on the inputs the layers saw."""
    seen: list[tuple[nn.Module, np.ndarray]] = []
    hooks = []
    in_conv = {id(m.qlinear) for m in model.modules() if isinstance(m, CONVS)}
    for m in model.modules():
        if isinstance(m, CONVS):
            acts = m.qlinear.act != "none"  # per tensor: the conv input's codes
        else:
            acts = isinstance(m, ActQuant) or (isinstance(m, QuantLinear) and m.act != "none"
                                               and id(m) not in in_conv)
        if acts:
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args: seen.append((mod, args[0].detach().float().numpy()))))
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    out = []
    for mod, x in seen:
        if isinstance(mod, CONVS):
            mod = mod.qlinear
        if isinstance(mod, ActQuant):
            s, (lo, hi) = np.float32(mod.scale), (-128, 127) if mod.fmt == "int8" else (0, 255)
            zp = 0 if mod.zero_point is None else int(mod.zero_point)
        elif mod.act == "int8_static":
            s, (lo, hi), zp = np.float32(mod.act_scale), (-127, 127), 0
        else:  # per-row dynamic: max|x| / 127 (0 -> 1)
            amax = np.abs(x).max(-1, keepdims=True)
            s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
            (lo, hi), zp = (-127, 127), 0
        r = (np.float32(1) / s).astype(np.float32)
        out.append(np.clip(np.round(x * r) + zp, lo, hi))
    return out


def compare_codes(ours: list[np.ndarray], theirs: list[np.ndarray]) -> tuple[float, int]:
    """(fraction of activation codes equal, largest difference)."""
    assert len(ours) == len(theirs)
    same = total = worst = 0
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        d = np.abs(a.astype(np.int64) - b.astype(np.int64))
        same, total, worst = same + int((d == 0).sum()), total + d.size, max(worst, int(d.max()))
    return same / total, worst


def export(model, tmp_path, name="model.onnx", **kw) -> onnx.ModelProto:
    path = qkern.export(model, tmp_path / name, format="onnx", **kw)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    return proto
