"""The specs ``qkern.save`` writes for the modules beyond weight-quantized layers
(docs/streaming_load.md, "The file format"): the integer-only modules of
``IntegerOnlyConfig`` (``IntegerLinear``, ``IntegerConv2d``, ``IntegerLinearIO``,
``IntegerReLU``, the integer pools and the ``Identity`` a folded ReLU left), the low-rank
layers (``LowRankLinear``, ``CompensatedLinear``: each part a spec of its own) and the int8
attention rules of ``QuantizedAttentionConfig`` (``Int8Attention``, in the separate metadata
key ``qkern_attention``: they are re-attached to the attention modules on load, not swapped
in for a float layer). :mod:`qkern.io.serialization` calls these; nested specs are checked,
rebuilt and verified through the callbacks it passes (its own recursive functions).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from torch import nn

from ..nn import (
    CompensatedLinear,
    FloatBoundary,
    Int8Attention,
    IntegerAvgPool2d,
    IntegerConv2d,
    IntegerLinear,
    IntegerLinearIO,
    IntegerMaxPool2d,
    IntegerModel,
    IntegerReLU,
    LowRankLinear,
    QuantLinear,
)
from ..quantization.qat.attention import attach_attention

__all__ = ["EXTRA_FIELDS", "BadFile", "attach_saved_attention", "attention_specs",
           "check_attention_loaded", "check_attention_specs", "check_extra_loaded",
           "check_extra_spec", "check_savable", "extra_spec", "identity_specs", "rebuild_extra"]


class BadFile(ValueError):
    """A qkern file whose contents cannot be loaded (the message names the path and what is
    wrong)."""


_REQUANT = {"in_zp": (int,), "out_zp": (int,), "qmin": (int,), "qmax": (int,),
            "in_scale": (float, int), "out_scale": (float, int), "out_bits": (int,),
            "per_channel": (bool,), "bias": (bool,)}
_POOL = {"kernel_size": (list,), "stride": (list,)}
#: the fields of each extra spec and their JSON types (merged into serialization's table)
EXTRA_FIELDS = {
    "IntegerLinear": _REQUANT,
    "IntegerConv2d": {**_REQUANT, "stride": (list,), "padding": (list,)},
    "IntegerLinearIO": {"in_scale": (float, int), "in_zp": (int,), "out_scale": (float, int),
                        "out_zp": (int,), "layer": (dict,)},
    "IntegerReLU": {"zp": (int,)}, "IntegerMaxPool2d": _POOL, "IntegerAvgPool2d": _POOL,
    "Identity": {},
    "LowRankLinear": {"rank": (int,), "down": (dict, None), "up": (dict, None),
                      "bias": (bool,)},
    "CompensatedLinear": {"base": (dict,), "side": (dict,)},
}
# the float module each extra spec is built on
_FLOAT = {"IntegerLinear": (nn.Linear,), "IntegerConv2d": (nn.Conv2d,),
          "IntegerLinearIO": (nn.Linear,), "IntegerReLU": (nn.ReLU,),
          "IntegerMaxPool2d": (nn.MaxPool2d,), "IntegerAvgPool2d": (nn.AvgPool2d,),
          "Identity": (nn.ReLU, nn.Dropout, nn.Identity), "LowRankLinear": (nn.Linear,),
          "CompensatedLinear": (nn.Linear,)}


def _requant_spec(m) -> dict:
    return {"in_zp": m.in_zp, "out_zp": m.out_zp, "qmin": m.qmin, "qmax": m.qmax,
            "in_scale": m.in_scale, "out_scale": m.out_scale, "out_bits": m.out_bits,
            "per_channel": m.m0.numel() != 1, "bias": m.bias_q.numel() > 0}


def extra_spec(m: nn.Module, spec_of: Callable) -> dict | None:
    """The spec of ``m`` if it is one of this module's types (``spec_of``: serialization's
    spec function, for the parts), else None."""
    if isinstance(m, IntegerLinear):
        return {"type": "IntegerLinear", **_requant_spec(m)}
    if isinstance(m, IntegerConv2d):
        return {"type": "IntegerConv2d", **_requant_spec(m), "stride": list(m.stride),
                "padding": list(m.padding)}
    if isinstance(m, IntegerLinearIO):
        return {"type": "IntegerLinearIO", "in_scale": m.quant_in.scale,
                "in_zp": m.quant_in.zero_point, "out_scale": m.dequant_out.scale,
                "out_zp": m.dequant_out.zero_point, "layer": extra_spec(m.layer, spec_of)}
    if isinstance(m, IntegerReLU):
        return {"type": "IntegerReLU", "zp": m.zp}
    if isinstance(m, (IntegerMaxPool2d, IntegerAvgPool2d)):
        return {"type": type(m).__name__, "kernel_size": list(m.kernel_size),
                "stride": list(m.stride)}
    if isinstance(m, LowRankLinear):
        return {"type": "LowRankLinear", "rank": m.rank, "bias": m.bias is not None,
                "down": None if type(m.down) is nn.Linear else spec_of(m.down),
                "up": None if type(m.up) is nn.Linear else spec_of(m.up)}
    if isinstance(m, CompensatedLinear):
        return {"type": "CompensatedLinear", "base": spec_of(m.base),
                "side": extra_spec(m.side, spec_of)}
    return None


def identity_specs(model: nn.Module) -> dict[str, dict]:
    """``{name: {"type": "Identity"}}`` for each ``nn.Identity`` child of an ``nn.Sequential``
    holding integer layers (a ReLU folded into a clamp, a Dropout dropped): the float model's
    module there becomes an Identity on load."""
    out = {}
    for pname, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential) or not any(
                isinstance(c, (IntegerLinear, IntegerConv2d)) for c in mod.children()):
            continue
        for cname, c in mod.named_children():
            if type(c) is nn.Identity:
                out[f"{pname}.{cname}" if pname else cname] = {"type": "Identity"}
    return out


def check_savable(model: nn.Module) -> None:
    if isinstance(model, IntegerModel):
        raise ValueError("qkern.save: save the converted nn.Sequential (IntegerModel.body) "
                         "and wrap the loaded model in qkern.IntegerModel again (its float "
                         "boundary is computed from the layers)")


def check_extra_spec(where: str, name: str, spec: dict, check: Callable) -> None:
    """The nested specs of an extra spec are specs of the right types (``check``:
    serialization's spec check, run on each part)."""
    t = spec["type"]
    parts = {"IntegerLinearIO": {"layer": ("IntegerLinear",)},
             "LowRankLinear": {"down": ("QuantLinear",), "up": ("QuantLinear",)},
             "CompensatedLinear": {"base": None, "side": ("LowRankLinear",)}}.get(t, {})
    for key, types in parts.items():
        part = spec[key]
        if part is None:
            continue
        check(where, f"{name}.{key}", part)
        if types is not None and part["type"] not in types:
            raise BadFile(f"{where}: layer {name!r}: the {t} spec's {key!r} must be a "
                          f"{' or '.join(types)} spec, got {part['type']!r}")
    for key in ("stride", "padding", "kernel_size"):
        v = spec.get(key)
        if v is not None and (len(v) != 2 or any(type(x) is not int or x < 0 for x in v)):
            raise BadFile(f"{where}: layer {name!r}: field {key!r} must be two integers >= 0, "
                          f"got {json.dumps(v)[:60]}")


def _requant_kw(s: dict) -> dict:
    return dict(in_zp=s["in_zp"], out_zp=s["out_zp"], qmin=s["qmin"], qmax=s["qmax"],
                in_scale=s["in_scale"], out_scale=s["out_scale"])


def _integer_linear(n: int, k: int, s: dict) -> IntegerLinear:
    c = n if s["per_channel"] else 1
    return IntegerLinear(torch.zeros(n, k, dtype=torch.int8),
                         torch.zeros(n if s["bias"] else 0, dtype=torch.int32),
                         torch.zeros(c, dtype=torch.int32), torch.zeros(c, dtype=torch.int32),
                         **_requant_kw(s), out_bits=s["out_bits"])


def _meta_linear(k: int, n: int) -> nn.Linear:
    return nn.Linear(k, n, bias=False, device="meta")


def rebuild_extra(name: str, f: nn.Module, s: dict, rebuild: Callable, where: str
                  ) -> nn.Module:
    """The module an extra spec describes, with placeholder tensors (the file's replace
    them), of the float module ``f``'s shape; ``rebuild(name, float_mod, spec)`` builds a
    part that has a spec of its own."""
    t = s["type"]
    if not isinstance(f, _FLOAT[t]) or (t == "Identity" and type(f) not in _FLOAT[t]):
        want = " / ".join(f"nn.{c.__name__}" for c in _FLOAT[t])
        raise BadFile(f"{where}: layer {name!r}: the file has a {t} built from {want}, the "
                      f"model has {type(f).__name__} there")
    if t == "Identity":
        return nn.Identity()
    if t == "IntegerReLU":
        if not -128 <= s["zp"] <= 127:
            raise ValueError(f"zp must be an int8 value, got {s['zp']}")
        return IntegerReLU(s["zp"])
    if t in ("IntegerMaxPool2d", "IntegerAvgPool2d"):
        if min(s["kernel_size"] + s["stride"]) < 1:
            raise ValueError("kernel_size and stride must be >= 1")
        cls = IntegerMaxPool2d if t == "IntegerMaxPool2d" else IntegerAvgPool2d
        return cls(s["kernel_size"], s["stride"])
    n, k = int(f.weight.shape[0]), int(f.weight.shape[1])
    if t == "IntegerLinear":
        return _integer_linear(n, k, s)
    if t == "IntegerConv2d":
        if f.groups != 1 or tuple(f.dilation) != (1, 1):
            raise ValueError("IntegerConv2d needs a conv with groups 1 and dilation 1")
        c = n if s["per_channel"] else 1
        return IntegerConv2d(torch.zeros(tuple(f.weight.shape), dtype=torch.int8),
                             torch.zeros(n if s["bias"] else 0, dtype=torch.int32),
                             torch.zeros(c, dtype=torch.int32), torch.zeros(c, dtype=torch.int32),
                             s["stride"], s["padding"], **_requant_kw(s))
    if t == "IntegerLinearIO":
        return IntegerLinearIO(FloatBoundary(s["in_scale"], s["in_zp"]),
                               _integer_linear(n, k, s["layer"]),
                               FloatBoundary(s["out_scale"], s["out_zp"]))
    if t == "LowRankLinear":
        r = s["rank"]
        if r < 1:
            raise ValueError(f"rank must be >= 1, got {r}")
        down, up = _meta_linear(k, r), _meta_linear(r, n)
        if s["down"] is not None:
            down = rebuild(f"{name}.down", down, s["down"])
        if s["up"] is not None:
            up = rebuild(f"{name}.up", up, s["up"])
        bias = torch.empty(n, device="meta") if s["bias"] else None
        return LowRankLinear(down, up, bias)
    # CompensatedLinear: the base on the float layer, the side of its shape
    side = rebuild_extra(f"{name}.side", _meta_linear(k, n), s["side"], rebuild, where)
    return CompensatedLinear(rebuild(f"{name}.base", f, s["base"]), side)


def _check_requant(where: str, name: str, m) -> None:
    n = m.w_q.shape[0]
    if m.m0.numel() not in (1, n) or m.shift.numel() != m.m0.numel():
        raise BadFile(f"{where}: tensors '{name}.m0' / '{name}.shift': need 1 or {n} values "
                      f"each, got {m.m0.numel()} and {m.shift.numel()}")
    if bool((m.m0 < 0).any()):
        raise BadFile(f"{where}: tensor '{name}.m0': fixed-point multipliers must be >= 0")
    if bool(((m.shift < -31) | (m.shift > 30)).any()):
        raise BadFile(f"{where}: tensor '{name}.shift': shifts must lie in [-31, 30]")
    if m.bias_q.numel() not in (0, n):
        raise BadFile(f"{where}: tensor '{name}.bias_q': need 0 or {n} values, got "
                      f"{m.bias_q.numel()}")


def check_extra_loaded(where: str, name: str, m: nn.Module, check: Callable) -> None:
    """The loaded tensors of an extra module are usable (``check(where, name, module)``:
    serialization's check, for the parts)."""
    if isinstance(m, (IntegerLinear, IntegerConv2d)):
        _check_requant(where, name, m)
    elif isinstance(m, IntegerLinearIO):
        _check_requant(where, name + ".layer", m.layer)
    elif isinstance(m, LowRankLinear):
        for part in ("down", "up"):
            sub = getattr(m, part)
            if isinstance(sub, QuantLinear):
                check(where, f"{name}.{part}", sub)
            elif not bool(torch.isfinite(sub.weight).all()):
                raise BadFile(f"{where}: tensor '{name}.{part}.weight': must be finite")
    elif isinstance(m, CompensatedLinear):
        check(where, name + ".base", m.base)
        check_extra_loaded(where, name + ".side", m.side, check)


# ---- the int8 attention rules: metadata 'qkern_attention' ---------------------------------

def attention_specs(model: nn.Module) -> dict[str, dict]:
    """``{attention module name: {"p_fmt", "heads", "k_channels"}}`` of every attention
    module whose ``qat_attention`` is an :class:`~qkern.nn.Int8Attention` (its scales are
    the state dict's ``<name>.qat_attention.{q,k,v}_scale``)."""
    return {n: {"p_fmt": m.qat_attention.p_fmt, "heads": m.qat_attention.heads,
                "k_channels": int(m.qat_attention.k_scale.shape[1])}
            for n, m in model.named_modules()
            if isinstance(getattr(m, "qat_attention", None), Int8Attention)}


def check_attention_specs(where: str, specs) -> dict[str, dict]:
    """The parsed ``qkern_attention`` metadata, checked (BadFile naming what is wrong)."""
    if not isinstance(specs, dict):
        raise BadFile(f"{where}: metadata 'qkern_attention' must be a JSON object mapping "
                      f"attention module names to specs, got {type(specs).__name__}")
    for name, s in specs.items():
        ok = isinstance(s, dict) and isinstance(s.get("p_fmt"), str) and all(
            type(s.get(k)) is int and s[k] >= 1 for k in ("heads", "k_channels"))
        if not ok:
            raise BadFile(f"{where}: attention {name!r}: the spec must be an object with "
                          f"'p_fmt' (a string), 'heads' and 'k_channels' (integers >= 1), "
                          f"got {json.dumps(s)[:100]}")
    return specs


def attach_saved_attention(model: nn.Module, specs: dict[str, dict], where: str) -> None:
    """Attaches an :class:`~qkern.nn.Int8Attention` (unit placeholder scales: the file's
    replace them) to each attention module ``specs`` names, through the attention hook."""
    if not specs:
        return
    built = {}
    for name, s in specs.items():
        h, c = s["heads"], s["k_channels"]
        try:
            built[name] = Int8Attention(torch.ones(h), torch.ones(h, c), torch.ones(h),
                                        s["p_fmt"])
        except ValueError as e:
            raise BadFile(f"{where}: attention {name!r}: {e}") from None
    try:
        attach_attention(model, lambda name, mod: built.get(name), "qkern.load")
    except ValueError as e:
        raise BadFile(f"{where}: the file has int8 attention for {sorted(specs)[:4]}: {e}"
                      ) from None
    lost = [n for n, a in built.items() if getattr(_get(model, n), "qat_attention", None)
            is not a]
    if lost:
        raise BadFile(f"{where}: the file has int8 attention for {lost[:4]}, which the model "
                      "has no hookable attention module for")


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def check_attention_loaded(where: str, model: nn.Module, specs: dict[str, dict]) -> None:
    """The loaded scales pass Int8Attention's own checks (finite, > 0)."""
    for name in specs:
        a = model.get_submodule(name).qat_attention
        try:
            Int8Attention(a.q_scale, a.k_scale, a.v_scale, a.p_fmt)
        except ValueError as e:
            raise BadFile(f"{where}: tensors '{name}.qat_attention.*': {e}") from None
