"""``qkern.save`` / ``qkern.load``: a converted model as one safetensors file.

The file holds the model's whole state dict (packed codes, scales, activation scales, and the
float parts) plus, in its metadata, the qkern version, the quant config (JSON) and a spec of
every quantized layer (its module type, format, group size, activation mode...). ``load``
rebuilds those layers on a float model of the same architecture and then loads the tensors,
checking names, shapes and kernels and saying what does not match. A loaded layer passes the
checks a freshly built one passes: ``act_scale`` (and LLM.int8's ``outlier_threshold``) goes
through the layer's constructor, scales and zero points through the checks ``qkern.quantize``
applies to given ones; a bad value is a ValueError naming the path and the tensor. A malformed
file of any kind (metadata that is not JSON or not of the expected shape, missing or mistyped
spec fields, unknown layer types, formats or kernels, tensors that do not fit) raises
``BadFile``, a ValueError naming the path and what is wrong.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable

import torch
from torch import nn

from ..formats import Format
from ..formats import get as get_format
from ..kernels.base import FALLBACK
from ..layout import Layout
from ..nn import (
    DynamicWeightLinear,
    QuantConv1d,
    QuantConv2d,
    QuantEmbedding,
    QuantLinear,
)
from ..ops.tiles import from_tiles
from ..quantization import (
    ActQuant,
    BaseConfig,
    ObservedInput,
    ParallelSum,
    linearize_conv1d,
    notify_quantized,
)
from ..quantize import check_params
from ..version import __version__
from ..vq.linear import VQLinear
from .extras import (
    EXTRA_FIELDS,
    BadFile,
    attach_saved_attention,
    attention_specs,
    check_attention_loaded,
    check_attention_specs,
    check_extra_loaded,
    check_extra_spec,
    check_savable,
    extra_spec,
    identity_specs,
    rebuild_extra,
)
from .hf_config import model_from_config
from .safetensors import write_safetensors
from .shards import read_checkpoint, read_owned
from .skeleton import (
    meta_tensors,
    retie,
    skeleton_conv,
    skeleton_dynamic,
    skeleton_embedding,
    skeleton_linear,
    structure_copy,
    tied_groups,
)

__all__ = ["BadFile", "check_loaded_layer", "layer_specs", "load", "rebuild_layer", "save"]

FORMAT_VERSION = "1"


def _linear_spec(m: QuantLinear) -> dict:
    q = m.weight_q
    spec = {"fmt": q.format.name, "group_size": q.group_size,
            "symmetric": q.zero_point is None, "act": m.act, "mode": m.mode,
            "quantizer": q.quantizer, "double_quant": q.double_quant is not None,
            "kernel": m.kernel, "bias": m.bias is not None}
    if q.zero_point is not None and q.zero_point.is_floating_point():
        spec["float_zero"] = True  # HQQ: float32 zero points (the buffers hold them)
    return spec


def _spec(m: nn.Module) -> dict | None:
    if isinstance(m, QuantLinear):
        return {"type": "QuantLinear", **_linear_spec(m)}
    if isinstance(m, (QuantConv1d, QuantConv2d)):
        return {"type": type(m).__name__, **_linear_spec(m.qlinear)}
    if isinstance(m, DynamicWeightLinear):  # the float weight is in the state dict
        return {"type": "DynamicWeightLinear", "fmt": m.fmt, "group_size": m.group_size,
                "symmetric": m.symmetric, "rounding": m.rounding, "bias": m.bias is not None}
    if isinstance(m, QuantEmbedding):
        q = m.weight_q
        return {"type": "QuantEmbedding", "fmt": q.format.name, "group_size": q.group_size,
                "symmetric": q.zero_point is None}
    if isinstance(m, ActQuant):
        return {"type": "ActQuant", "fmt": m.fmt, "zero_point": m.zero_point is not None,
                "inner": _spec(m.module)}
    if isinstance(m, ParallelSum):  # TTQ: one layer as the sum of two ternary layers
        return {"type": "ParallelSum", "parts": [_spec(p) for p in m.parts]}
    if isinstance(m, VQLinear):  # codes, codebooks and scales are in the state dict
        return {"type": "VQLinear", "group_rows": m.group_rows, "lattice": m.lattice,
                "bias": m.bias is not None, "mode": m.mode}
    return extra_spec(m, _spec)  # integer-only, low-rank (io/extras.py)


def _make_linear(cls: type, prefix: str) -> Callable:
    """Builds a QuantLinear / QuantConv from the float layer with the saved ``act_scale``
    (int8_static) or ``outlier_threshold`` (int8_mixed) tensor of the layer (``prefix``: where
    the QuantLinear sits in it), so the constructor checks it as it checks a user's value."""

    def make(f: nn.Module, s: dict, saved: Callable[[str], torch.Tensor | None], where: str,
             name: str):
        if s.get("float_zero") and cls is not QuantLinear:
            raise ValueError(f"float zero points (HQQ) come with QuantLinear layers, not "
                             f"{cls.__name__}")
        key = {"int8_static": "act_scale", "int8_mixed": "outlier_threshold"}.get(s["act"])
        v = None if key is None else saved(prefix + key)

        def build(value):
            if cls is QuantLinear:
                return skeleton_linear(f, s, value, value)
            return skeleton_conv(cls, f, s, value, value)

        try:
            return build(v)
        except _BUILD_ERRORS as e:
            if v is None:
                raise
            build(None)  # with a valid placeholder value it builds: the file's value is bad
            raise BadFile(f"{where}: tensor '{name}.{prefix}{key}': {e}") from None

    return make


_REBUILD: dict[str, tuple[type, Callable]] = {
    "QuantLinear": (nn.Linear, _make_linear(QuantLinear, "")),
    "QuantConv1d": (nn.Conv1d, _make_linear(QuantConv1d, "qlinear.")),
    "QuantConv2d": (nn.Conv2d, _make_linear(QuantConv2d, "qlinear.")),
    "DynamicWeightLinear": (nn.Linear, lambda f, s, saved, where, name:
                            skeleton_dynamic(f, s)),
    "QuantEmbedding": (nn.Embedding, lambda f, s, saved, where, name:
                       skeleton_embedding(f, s)),
    "VQLinear": (nn.Linear, lambda f, s, saved, where, name: _vq_linear(f, s, saved)),
}


def _vq_linear(f: nn.Linear, s: dict, saved: Callable) -> VQLinear:
    """A VQLinear from the file's codes / codebooks / scales (its constructor checks them),
    of the float layer's shape."""
    codes, books = saved("codes"), saved("codebooks")
    if codes is None or books is None:
        raise ValueError("the file has no codes / codebooks for this VQLinear")
    m = VQLinear(codes, books, saved("scales"), f.bias, s["group_rows"], lattice=s["lattice"],
                 mode=s.get("mode", "exact"))
    if (m.out_features, m.in_features) != tuple(f.weight.shape):
        raise ValueError(f"its codes hold a ({m.out_features}, {m.in_features}) weight, the "
                         f"model's layer is {tuple(f.weight.shape)}")
    return m


# the fields of each layer spec in the file and their JSON types (None: null)
_LINEAR_FIELDS = {"fmt": (str,), "group_size": (int, None), "symmetric": (bool,),
                  "act": (str,), "mode": (str,), "quantizer": (str,), "double_quant": (bool,)}
_OPTIONAL = {"kernel": (str, None), "bias": (bool,), "float_zero": (bool,)}
_FIELDS = {"QuantLinear": _LINEAR_FIELDS, "QuantConv1d": _LINEAR_FIELDS,
           "QuantConv2d": _LINEAR_FIELDS,
           "QuantEmbedding": {"fmt": (str,), "group_size": (int, None), "symmetric": (bool,)},
           "DynamicWeightLinear": {"fmt": (str,), "group_size": (int, None),
                                   "symmetric": (bool,), "rounding": (str,)},
           "ActQuant": {"fmt": (str,), "zero_point": (bool,), "inner": (dict, None)},
           "VQLinear": {"group_rows": (int,), "lattice": (str, None)},  # + optional "mode"
           "ParallelSum": {"parts": (list,)}, **EXTRA_FIELDS}
_JSON_NAMES = {str: "a string", int: "an integer", bool: "true or false", dict: "an object",
               list: "an array", None: "null", float: "a number"}


def _json_type(v) -> type | None:
    return None if v is None else bool if isinstance(v, bool) else type(v)


def _check_spec(where: str, name: str, spec) -> None:
    """The spec of layer ``name`` has the fields its type needs, of the right JSON types."""
    if not isinstance(spec, dict):
        raise BadFile(f"{where}: layer {name!r}: the spec must be a JSON object, got "
                      f"{json.dumps(spec)[:60]}")
    t = spec.get("type")
    if not isinstance(t, str) or t not in _FIELDS:
        raise BadFile(f"{where}: layer {name!r}: unknown quantized layer type "
                      f"{json.dumps(t)[:60]}; known: {sorted(_FIELDS)}")
    fields = _FIELDS[t]
    for key, types in {**fields, **_OPTIONAL}.items():
        if key not in spec:
            if key in fields:
                raise BadFile(f"{where}: layer {name!r}: the {t} spec has no field {key!r}")
            continue
        if _json_type(spec[key]) not in types:
            want = " or ".join(_JSON_NAMES[x] for x in types)
            raise BadFile(f"{where}: layer {name!r}: field {key!r} must be {want}, got "
                          f"{json.dumps(spec[key])[:60]}")
    if t == "ActQuant" and spec["inner"] is not None:
        _check_spec(where, name + ".module", spec["inner"])
    if t == "ParallelSum":
        if not spec["parts"]:
            raise BadFile(f"{where}: layer {name!r}: a ParallelSum with no parts")
        for i, part in enumerate(spec["parts"]):
            _check_spec(where, f"{name}.parts.{i}", part)
    check_extra_spec(where, name, spec, _check_spec)


def _metadata_json(where: str, meta: dict, key: str, default: str):
    """The JSON value of metadata ``key``, or BadFile saying why it cannot be read."""
    try:
        return json.loads(meta.get(key, default))
    except RecursionError:
        raise BadFile(f"{where}: metadata {key!r} is JSON nested too deeply to read") from None
    except ValueError as e:
        raise BadFile(f"{where}: metadata {key!r} is not valid JSON ({e})") from None


def _layer_specs(where: str, meta: dict) -> dict:
    layers = _metadata_json(where, meta, "qkern_layers", "{}")
    if not isinstance(layers, dict):
        raise BadFile(f"{where}: metadata 'qkern_layers' must be a JSON object mapping layer "
                      f"names to specs, got {type(layers).__name__}")
    for name, spec in layers.items():
        if not name:
            raise BadFile(f"{where}: a layer spec has an empty name (the whole model)")
        _check_spec(where, name, spec)
    return layers


def _config(where: str, meta: dict) -> BaseConfig | None:
    cfg = _metadata_json(where, meta, "qkern_config", "null")
    if cfg is None:
        return None
    try:
        return BaseConfig.from_dict(cfg)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise BadFile(f"{where}: metadata 'qkern_config' is not a valid config: {e}") from None


# what a layer constructor given a malformed spec or tensor may raise
_BUILD_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError,
                 OverflowError, RecursionError)


def _rebuild(name: str, float_mod: nn.Module, spec: dict, tensors: dict, where: str
             ) -> nn.Module:
    """The quantized layer ``spec`` describes, built from ``float_mod`` with the saved values
    its constructor takes (``tensors``: the file's, ``where``: the path for messages)."""
    t = spec.get("type")
    if t == "ActQuant":
        inner = float_mod if spec["inner"] is None else _rebuild(name + ".module", float_mod,
                                                                 spec["inner"], tensors, where)
        zp = torch.zeros((), dtype=torch.int32) if spec["zero_point"] else None
        return ActQuant(inner, spec["fmt"], torch.ones(()), zp)
    if t == "ParallelSum":
        parts = []
        for i, part in enumerate(spec["parts"]):
            f = copy.deepcopy(float_mod)
            if not part.get("bias", True) and getattr(f, "bias", None) is not None:
                f.bias = None  # the bias lives on the first part only
            parts.append(_rebuild(f"{name}.parts.{i}", f, part, tensors, where))
        return ParallelSum(parts)
    if t in EXTRA_FIELDS:
        return rebuild_extra(name, float_mod, spec, lambda n, f, s: _rebuild(n, f, s, tensors,
                                                                             where), where)
    want, make = _REBUILD[t]
    if type(float_mod) is not want:
        raise BadFile(f"{where}: layer {name!r}: the file has a {t} built from an "
                         f"nn.{want.__name__}, the model has {type(float_mod).__name__} there")
    if spec.get("bias") and getattr(float_mod, "bias", None) is None:
        # bias correction gave this layer a bias: the (copied) float layer gets a zero one
        out = float_mod.weight.shape[0]
        float_mod.bias = nn.Parameter(torch.zeros(out, dtype=float_mod.weight.dtype,
                                                  device="meta"))
    built = make(float_mod, spec, lambda key: tensors.get(f"{name}.{key}"), where, name)
    kernel = spec.get("kernel")
    got = getattr(built, "kernel", None) or getattr(getattr(built, "qlinear", None), "kernel",
                                                   None)
    if kernel is not None and got != kernel:
        raise BadFile(f"{where}: layer {name!r}: saved with kernel {kernel!r}, this build "
                         f"would use {got!r} (a different qkern version, missing compiled "
                         "kernels, or a bad file)")
    return built


def _check_params(where: str, name: str, fmt: Format, lay: Layout, scale: torch.Tensor,
                  zero_point: torch.Tensor | None, keys: tuple[str, str], note: str = "",
                  quantizer: str = "midtread") -> None:
    """Loaded scales / zero points (in the user layout ``lay``) pass the checks
    ``qkern.quantize`` applies to given ones (finite, positive scales; zero points in the
    format's code range), or BadFile names the tensor (``keys``: the scale's and the zero
    point's names)."""
    try:  # no data: the checks alone (no float tensor of the layer's shape)
        check_params(fmt, lay, scale.reshape(lay.scale_shape),
                     None if zero_point is None else zero_point.reshape(lay.scale_shape),
                     symmetric=zero_point is None, quantizer=quantizer)
    except ValueError as e:
        zp = str(e).startswith("zero_point")
        raise BadFile(f"{where}: tensor '{name}.{keys[zp]}': {e}{note if zp else ''}") from None


def _check_float_zero(where: str, name: str, z: torch.Tensor) -> None:
    if not bool(torch.isfinite(z).all()):
        raise BadFile(f"{where}: tensor '{name}': float zero points must be finite")


def _check_linear(where: str, name: str, m: QuantLinear) -> None:
    q, bufs = m.weight_q, m.packed_buffers()
    if q.format.kind != "int":
        return
    n = q.shape[0]
    for fam in ("w4", "w23"):  # tiled: (N_pad // 8, K // G, 8)
        if m.kernel.startswith(fam + "_"):
            zeros = bufs.get(f"{fam}_zeros")
            if zeros is not None and zeros.is_floating_point():
                _check_float_zero(where, f"{name}.{fam}_zeros", zeros)
                zeros = None
            elif zeros is not None and fam == "w4" and not q.format.signed:
                zeros = zeros + 8  # uint4 runs as int4 codes u - 8, zero points z - 8
            _check_params(where, name, q.format, q.layout, from_tiles(bufs[f"{fam}_scales"], n),
                          None if zeros is None else from_tiles(zeros, n),
                          (f"{fam}_scales", f"{fam}_zeros"), quantizer=q.quantizer)
    if m.kernel == FALLBACK and bufs["zp"].is_floating_point():
        _check_float_zero(where, f"{name}.zp", bufs["zp"])
        lay = q.layout
        _check_params(where, name, q.format, lay, lay.scale_from_kernel(bufs["scale"]), None,
                      ("scale", "zp"), quantizer=q.quantizer)
    elif m.kernel == FALLBACK:  # kernel layout, zero points stored minus qmin
        lay, qmin = q.layout, q.format.qmin
        zp = lay.scale_from_kernel(bufs["zp"] + qmin)
        if q.zero_point is None and bool((zp != 0).any()):
            raise BadFile(f"{where}: tensor '{name}.zp': a symmetric layer has zero points "
                          f"(stored values must all be {-qmin})")
        _check_params(where, name, q.format, lay, lay.scale_from_kernel(bufs["scale"]),
                      None if q.zero_point is None else zp,
                      ("scale", "zp"), note=f" (stored as zero point - qmin, qmin = {qmin})",
                      quantizer=q.quantizer)


def _check_loaded(where: str, name: str, m: nn.Module) -> None:
    """The loaded values of a rebuilt layer pass the checks a freshly built one passed."""
    if isinstance(m, QuantLinear):
        _check_linear(where, name, m)
    elif isinstance(m, (QuantConv1d, QuantConv2d)):
        _check_linear(where, name + ".qlinear", m.qlinear)
    elif isinstance(m, QuantEmbedding):
        if m.weight_q.format.kind == "int":
            q = m.weight_q
            _check_params(where, name, q.format, q.layout, m.scale, m.zero_point,
                          ("scale", "zero_point"), quantizer=q.quantizer)
    elif isinstance(m, ActQuant):
        _check_params(where, name, get_format(m.fmt), Layout("tensor", (), None, 1), m.scale,
                      m.zero_point, ("scale", "zero_point"))
        _check_loaded(where, name + ".module", m.module)
    elif isinstance(m, ParallelSum):
        for i, part in enumerate(m.parts):
            _check_loaded(where, f"{name}.parts.{i}", part)
    elif isinstance(m, VQLinear):
        for key in ("codebooks", "scales"):
            t = getattr(m, key)
            if t is not None and not bool(torch.isfinite(t).all()):
                raise BadFile(f"{where}: tensor '{name}.{key}': must be finite")
    else:
        check_extra_loaded(where, name, m, _check_loaded)


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """{module name: spec} of every quantized layer of ``model`` (its type, format, group
    size, activation mode, kernel...): what ``save`` writes in the metadata and what
    :func:`rebuild_layer` takes. An ActQuant's inner layer is covered by the ActQuant's."""
    specs = {n: s for n, m in model.named_modules() if n and (s := _spec(m)) is not None}
    specs.update(identity_specs(model))
    return {n: s for n, s in specs.items()
            if not any(n.startswith(o + ".") for o in specs if o != n)}


def rebuild_layer(name: str, float_mod: nn.Module, spec: dict, tensors, where: str
                  ) -> nn.Module:
    """The quantized layer ``spec`` (one value of :func:`layer_specs`) describes, built on
    ``float_mod`` (a float layer of the saved kind and shape, whose weights only shape the
    result: the saved tensors are loaded into it afterwards). ``tensors``: anything with
    ``.get(key)`` giving the saved tensor named ``key`` or None (the values a constructor
    checks: ``act_scale``, ``outlier_threshold``); ``where`` names the source in messages.
    BadFile when the spec is malformed or the layer cannot be built."""
    _check_spec(where, name, spec)
    try:
        return _rebuild(name, float_mod, spec, tensors, where)
    except BadFile:
        raise
    except _BUILD_ERRORS as e:
        raise BadFile(f"{where}: layer {name!r} cannot be rebuilt: {e} (its spec: "
                      f"{json.dumps(spec)[:200]})") from e


def check_loaded_layer(where: str, name: str, module: nn.Module) -> None:
    """The loaded values of a rebuilt layer pass the checks a freshly built one passes
    (finite positive scales, zero points in range...), or BadFile names the tensor."""
    _check_loaded(where, name, module)


def save(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Writes a converted model to ``path`` (safetensors, atomically). Refuses an existing
    path unless ``overwrite=True``, and a model that is prepared but not converted."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if getattr(model, "_qkern_state", None) is not None or any(
            isinstance(m, ObservedInput) for m in model.modules()):
        raise ValueError("this model is prepared but not converted: call qkern.convert first")
    check_savable(model)
    specs = layer_specs(model)
    config = getattr(model, "qkern_config", None)
    meta = {"qkern_format": FORMAT_VERSION, "qkern_version": __version__,
            "qkern_layers": json.dumps(specs),
            "qkern_attention": json.dumps(attention_specs(model)),
            "qkern_config": config.to_json() if config is not None else "null"}
    tensors = {k: v for k, v in model.state_dict().items() if v is not None}
    write_safetensors(path, tensors, meta, overwrite=overwrite)


def _target(model_or_factory, config, where: str) -> nn.Module:
    """The model to rebuild: a structure copy of a given model (its state-dict tensors as meta
    placeholders: nothing of the user's is copied or modified), a factory's result, or the
    architecture ``config`` names built by :func:`~qkern.io.skeleton.empty_init`."""
    if (model_or_factory is None) == (config is None):
        raise TypeError("qkern.load needs a model (or a function returning one) or config=, "
                        "exactly one of them")
    if config is not None:
        return model_from_config(config)
    if isinstance(model_or_factory, nn.Module):
        return structure_copy(model_or_factory)
    if callable(model_or_factory):
        model = model_or_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the factory returned {type(model).__name__}, not an nn.Module")
        return model
    raise TypeError("model_or_factory must be an nn.Module or a callable returning one")


def load(path: str | os.PathLike, model_or_factory: nn.Module | Callable[[], nn.Module]
         | None = None, *, config=None) -> nn.Module:
    """The quantized model saved at ``path`` (a qkern file, or a folder / index.json of
    transformers' sharded safetensors layout holding qkern metadata), rebuilt on
    ``model_or_factory``: a model of the saved architecture (never modified, and its
    weights are not copied: only its structure is), possibly built on the meta device
    (``with torch.device("meta")`` or ``with qkern.empty_init()``), or a function returning
    one; or on ``config=`` (a transformers config, or a transformers model folder) built
    with no weights. Quantized layers are built from their shapes only and every tensor
    comes from the file: no float weight of a quantized layer is materialized."""
    where = str(path)
    tensors, meta = read_checkpoint(path, with_metadata=True)
    if "qkern_layers" not in meta:
        raise BadFile(f"{where}: not a qkern file (no qkern metadata)")
    if meta.get("qkern_format") != FORMAT_VERSION:
        raise BadFile(f"{where}: qkern file format {meta.get('qkern_format')!r}, this qkern "
                      f"reads {FORMAT_VERSION!r}")
    layers, cfg = _layer_specs(where, meta), _config(where, meta)
    att = check_attention_specs(where, _metadata_json(where, meta, "qkern_attention", "{}"))
    model = _target(model_or_factory, config, where)
    linearize_conv1d(model)  # as quantization did: transformers' Conv1D -> nn.Linear
    ties = tied_groups(model)
    for name, spec in layers.items():
        try:
            float_mod = model.get_submodule(name)
        except AttributeError:
            raise BadFile(f"{where}: the model has no layer {name!r} (the file quantized it)"
                          ) from None
        # the skeleton's placeholder buffers let go at once: the file's replace them
        new = rebuild_layer(name, float_mod, spec, tensors, where).to("meta")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    attach_saved_attention(model, att, where)  # the int8 attention rules (io/extras.py)
    own = {k: v for k, v in model.state_dict().items() if v is not None}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} {tensors[k].dtype}, model "
              f"{tuple(own[k].shape)} {own[k].dtype}" for k in own if k in tensors
              and (tensors[k].shape != own[k].shape or tensors[k].dtype != own[k].dtype)]
    if missing or unexpected or shapes:
        parts = ([f"missing in the file: {missing[:10]}"] if missing else []) + \
                ([f"not in the model: {unexpected[:10]}"] if unexpected else []) + \
                ([f"shape/dtype mismatch: {shapes[:10]}"] if shapes else [])
        raise BadFile(f"{where} does not fit this model: " + "; ".join(parts))
    owned = read_owned(path, {k: tensors[k] for k in own})  # read, not mapped: no 2x peak
    del tensors
    model.load_state_dict(owned, strict=True, assign=True)
    del owned
    retie(model, ties, where)
    for m in model.modules():  # operands derived from the loaded tensors (VQLinear's)
        if callable(getattr(m, "refresh_kernel_operands", None)):
            m.refresh_kernel_operands()
    left = meta_tensors(model)
    if left:
        raise BadFile(f"{where}: no file tensor for {left[:10]} (left on the meta device: "
                      "non-persistent buffers of a model built on meta; build it with "
                      "qkern.empty_init(), which keeps buffers real)")
    for name in layers:
        _check_loaded(where, name, model.get_submodule(name))
    check_attention_loaded(where, model, att)
    if cfg is not None:
        model.qkern_config = cfg
    return notify_quantized(model.eval())
