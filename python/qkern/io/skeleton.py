"""Quantized layers built from a float layer's *shape* only, and models built without float
weights, for loading: ``qkern.load`` and the transformers integration rebuild each saved layer
here, then the file's tensors replace every buffer, so the float layer may live on the meta
device and no float weight of a quantized layer is ever materialized.

A skeleton layer is the layer the saved spec names (same kernel, same buffer names, shapes and
dtypes as a layer quantized from real weights) holding placeholder codes (zeros) and scales
(ones); the kernel's packing runs on those codes, one layer at a time.

:func:`empty_init` builds a model with its parameters on the meta device and its buffers real
(computed tables such as rotary embeddings are not in a checkpoint):
``with qkern.empty_init(): model = Factory()``.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from .. import formats as QF
from ..layout import Layout
from ..nn import DynamicWeightLinear, QuantEmbedding, QuantLinear
from ..quantize import double_quantize_scales
from ..tensor import QTensor

__all__ = ["blank_qtensor", "empty_init", "float_shape", "meta_tensors", "retie",
           "skeleton_conv", "skeleton_dynamic", "skeleton_embedding", "skeleton_linear",
           "structure_copy", "tied_groups"]


def float_shape(f: nn.Module) -> tuple[int, int]:
    """(out, in) of the matrix a quantized layer built on ``f`` holds: an nn.Linear's weight,
    an nn.Embedding's (num, dim), a conv's (out, in * prod(kernel)). Read from the shape
    only (``f`` may be on the meta device)."""
    w = f.weight
    return int(w.shape[0]), int(math.prod(w.shape[1:]))


def _layout(shape: tuple[int, int], fmt: QF.Format, group_size: int | None) -> Layout:
    """The layout ``from_float`` gives a weight of ``shape``: per row when ``group_size`` is
    None (block formats: their own block), else groups along the input dimension."""
    n, k = shape
    g = group_size if group_size is not None else fmt.block_size
    if g is None:
        return Layout("channel", (n, k), 0, max(k, 1))
    if isinstance(g, bool) or not isinstance(g, int) or g <= 0:
        raise ValueError(f"group_size must be a positive int, got {g!r}")
    if k % g:
        raise ValueError(f"group_size={g} does not divide in_features={k}; the model's layer "
                         f"is {n} x {k}")
    return Layout("group", (n, k), 1, g)


def blank_qtensor(shape: tuple[int, int], fmt: str, group_size: int | None, symmetric: bool,
                  quantizer: str = "midtread", double_quant: bool = False,
                  float_zero: bool = False) -> QTensor:
    """A QTensor of the given kind with zero codes and unit scales (zero points 0: int32, or
    float32 with ``float_zero``; double-quantized scales with ``double_quant``): what a
    layer is packed from before its saved tensors replace the packed buffers."""
    f = QF.get(fmt)
    lay = _layout(shape, f, group_size)
    code_dtype = torch.int8 if f.kind == "int" and f.signed else torch.uint8
    scale = torch.ones(lay.scale_shape)
    dq = None
    if double_quant:
        dq, scale = double_quantize_scales(scale.reshape(-1))
        scale = scale.reshape(lay.scale_shape)
    zp = None if symmetric else torch.zeros(lay.scale_shape, dtype=torch.float32 if float_zero
                                            else torch.int32)
    return QTensor(torch.zeros(lay.shape, dtype=code_dtype), scale, zp, f, lay,
                   quantizer=quantizer, double_quant=dq)


def _bias(f: nn.Module, spec: dict) -> torch.Tensor | None:
    """A meta placeholder for the layer's bias (the file's replaces it): where the float
    layer has one or the quantized layer gained one (bias correction)."""
    if getattr(f, "bias", None) is None and not spec.get("bias"):
        return None
    return torch.empty(float_shape(f)[0], device="meta")


def skeleton_linear(f: nn.Module, spec: dict, act_scale=None, threshold=None) -> QuantLinear:
    """The QuantLinear a saved linear spec describes (format, group size, symmetry,
    quantizer, double quantization, float zero points, activation mode, kernel mode), of the
    shape of ``f`` (nn.Linear or a conv's matrix), with placeholder codes. ``act_scale`` /
    ``threshold``: the saved values its constructor checks (int8_static / int8_mixed)."""
    q = blank_qtensor(float_shape(f), spec["fmt"], spec["group_size"], spec["symmetric"],
                      spec.get("quantizer", "midtread"), spec.get("double_quant", False),
                      spec.get("float_zero", False))
    act = spec["act"]
    if act == "int8_static" and act_scale is None:
        act_scale = 1.0
    if act == "int8_mixed" and threshold is None:
        threshold = 6.0
    return QuantLinear(q, _bias(f, spec), act=act, mode=spec["mode"],
                       act_scale=act_scale if act == "int8_static" else None,
                       threshold=threshold if act == "int8_mixed" else None)


def skeleton_conv(cls: type, conv: nn.Module, spec: dict, act_scale=None, threshold=None):
    """QuantConv1d / QuantConv2d (``cls``) of ``conv``'s geometry on a skeleton QuantLinear."""
    return cls.from_quant_linear(conv, skeleton_linear(conv, spec, act_scale, threshold))


def skeleton_embedding(emb: nn.Embedding, spec: dict) -> QuantEmbedding:
    if emb.max_norm is not None or emb.sparse:
        raise ValueError("QuantEmbedding does not support max_norm or sparse embeddings")
    return QuantEmbedding(blank_qtensor(float_shape(emb), spec["fmt"], spec["group_size"],
                                        spec["symmetric"]), emb.padding_idx)


def skeleton_dynamic(f: nn.Linear, spec: dict) -> DynamicWeightLinear:
    """A DynamicWeightLinear of ``f``'s shape whose float weight (saved in the file) is a meta
    placeholder; its options are checked on a one-row weight."""
    n, k = float_shape(f)
    m = DynamicWeightLinear(torch.zeros(1, k), None, spec["fmt"], spec["group_size"],
                            spec["symmetric"], spec["rounding"])
    m.out_features = n
    m.weight = nn.Parameter(torch.empty(n, k, device="meta"))
    b = _bias(f, spec)
    m.bias = None if b is None else nn.Parameter(torch.empty(n, device="meta"))
    return m


@contextlib.contextmanager
def empty_init():
    """Inside it, every parameter a module registers is created on the meta device (no
    memory); buffers stay real (rotary tables and other computed, unsaved buffers keep their
    values). ``with qkern.empty_init(): model = Factory()`` then ``qkern.load(path, model)``
    fills the parameters from the file."""
    old = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        old(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = old


def structure_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose state-dict tensors (parameters, persistent buffers) are meta
    placeholders of the same shape and dtype: the file fills them, so the user's float
    weights are neither copied nor modified. Non-persistent buffers (computed tables) are
    copied for real."""
    memo: dict[int, object] = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                           requires_grad=p.requires_grad)
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set \
                    and id(b) not in memo:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor (tied weights), in groups of two or more."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def retie(model: nn.Module, groups: list[list[str]], where: str) -> None:
    """Ties each group of parameter names again after a load that assigned them one by one
    (the first's tensor is shared); names no longer in the model (a tied layer that was
    quantized) are left out. The file's copies must be equal."""
    for names in groups:
        live = []
        for n in names:
            owner, _, leaf = n.rpartition(".")
            mod = model.get_submodule(owner)
            if isinstance(mod._parameters.get(leaf), nn.Parameter):
                live.append((mod, leaf, mod._parameters[leaf]))
        if len(live) < 2:
            continue
        first = live[0][2]
        for mod, leaf, p in live[1:]:
            if p.shape != first.shape or not torch.equal(p, first):
                raise ValueError(f"{where}: tied parameters {names} hold different values")
            mod._parameters[leaf] = first


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` still on the meta device."""
    out = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    return out + [n for n, b in model.named_buffers(remove_duplicate=False) if b.is_meta]
