"""compressed-tensors: the checkpoint format llm-compressor writes and vLLM loads natively
(``quant_method: "compressed-tensors"``), export and import.

A folder with ``config.json`` (the transformers config plus a ``quantization_config``) and
``model.safetensors``. Each quantized ``nn.Linear`` ``<name>`` stores, per the scheme's
``format`` (the compressors of the ``compressed-tensors`` package, version 0.20):

- ``pack-quantized`` (integer weights of 1-8 bits, no activation quantization: W4A16, W8A16,
  W4A16_ASYM): ``weight_packed`` int32 (out, ceil(in * bits / 32)), each row the LSB-first
  stream of the codes ``q + 2^(bits-1)`` (signed codes stored offset binary) cut into
  little-endian 32-bit words; ``weight_shape`` int64 [out, in]; ``weight_scale`` (out, groups)
  or (out, 1); asymmetric: ``weight_zero_point`` int32, the zero points (same signed domain,
  same offset) packed the same way along the OUTPUT dimension: (ceil(out * bits / 32), groups).
- ``int-quantized`` (integer weights with int8 activations: W8A8): ``weight`` int8 (out, in)
  holding the signed codes, ``weight_scale``, ``weight_zero_point`` int8 when asymmetric,
  ``input_scale`` (1,) for static per-tensor activations.
- ``naive-quantized`` / ``float-quantized`` (fp8 weights without / with activation
  quantization): ``weight`` float8_e4m3fn, ``weight_scale``.

A weight's value is ``(q - zero_point) * scale`` (``q * scale`` when symmetric), computed in
the scale's dtype; strategies: ``group`` (``group_size`` consecutive inputs), ``channel`` (one
per output row), ``tensor``. Activations: ``dynamic`` per ``token`` (row) or per ``tensor``,
or static per tensor with ``input_scale``.

qkern writes the scales as float32 (``dtype="float32"``, the default): the checkpoint then
dequantizes to exactly ``QuantLinear.dequantize_weight()``. ``dtype="bfloat16"`` /
``"float16"`` writes scales and float tensors in that dtype, as llm-compressor does for a half
precision model: each scale is rounded to nearest (relative error <= 2^-8 bfloat16, 2^-11
float16 for normal numbers), so every weight moves by at most that relative amount; a scale
that does not survive the rounding (overflow, underflow) is refused.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..nn import QuantLinear
from ..packing import pack_int32
from ..tensor import QTensor
from . import Format, register
from ._common import (
    check_layers,
    float_tensors,
    hf_config,
    quantized_layers,
    write_folder,
    write_json,
    write_tensors,
)
from .compressed_tensors_load import load_folder

__all__ = ["CT_VERSION", "CompressedTensors", "layer_scheme"]

#: the compressed-tensors release whose compressors this module follows (config "version")
CT_VERSION = "0.20.1"

#: qkern activation modes -> compressed-tensors input_activations (int8, symmetric)
ACT_ARGS = {
    "int8_dynamic": {"strategy": "token", "dynamic": True},
    "int8_token": {"strategy": "token", "dynamic": True},
    "int8_dynamic_tensor": {"strategy": "tensor", "dynamic": True},
    "int8_static": {"strategy": "tensor", "dynamic": False},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: bound on the relative rounding error of a normal number cast to each dtype
ROUND_ERROR = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@dataclass(frozen=True)
class Scheme:
    """One layer's compressed-tensors scheme: the storage ``format`` and the JSON
    ``weights`` / ``input_activations`` arguments (as sorted item tuples, hashable)."""

    format: str
    weights: tuple
    input_activations: tuple | None

    def as_json(self, targets: list[str]) -> dict:
        return {"format": self.format, "input_activations":
                None if self.input_activations is None else dict(self.input_activations),
                "output_activations": None, "targets": targets, "weights": dict(self.weights)}


def _args(num_bits: int, typ: str, symmetric: bool, strategy: str, group_size: int | None,
          dynamic: bool = False) -> tuple:
    return tuple(sorted({"num_bits": num_bits, "type": typ, "symmetric": symmetric,
                         "strategy": strategy, "group_size": group_size,
                         "dynamic": dynamic}.items()))


def layer_scheme(layer: QuantLinear, q: QTensor) -> Scheme | str:
    """The compressed-tensors scheme that holds ``layer`` (weights ``q``) exactly, or why
    none does."""
    fmt = q.format
    if q.double_quant is not None:
        return "double-quantized scales have no compressed-tensors scheme"
    if q.quantizer != "midtread":
        return f"the {q.quantizer} quantizer has no compressed-tensors scheme (midtread only)"
    is_int = fmt.kind == "int" and 2 <= fmt.bits <= 8
    if not is_int and fmt.name != "fp8_e4m3":
        return (f"format {fmt.name} has no compressed-tensors scheme (integer grids of 2-8 "
                "bits and fp8_e4m3 only)")
    zp = q.zero_point
    if zp is not None and zp.is_floating_point():
        return ("float zero points (HQQ) cannot be stored: compressed-tensors zero points are "
                "integers")
    if q.granularity == "group" and q.axis == 1:
        strategy, group_size = "group", q.group_size
    elif q.granularity == "channel" and q.axis == 0:
        strategy, group_size = "channel", None
    elif q.granularity == "tensor":
        strategy, group_size = "tensor", None
    else:
        return (f"granularity {q.granularity!r} along axis {q.axis} has no compressed-tensors "
                "strategy (groups along in_features, one scale per output row, or per tensor)")
    symmetric = zp is None and (not is_int or fmt.signed)
    if not symmetric:
        if strategy == "tensor":
            return "an asymmetric per-tensor weight has no packed compressed-tensors layout"
        if zp is not None:
            lo, hi = (fmt.qmin, fmt.qmax)
            if int(zp.min()) < lo or int(zp.max()) > hi:
                return (f"zero points in [{int(zp.min())}, {int(zp.max())}] lie outside the "
                        f"{fmt.name} code range [{lo}, {hi}]")
    if layer.act not in ("none", *ACT_ARGS):
        return f"activations {layer.act!r} have no compressed-tensors scheme"
    acts = None
    if layer.act != "none":
        acts = tuple(sorted({"num_bits": 8, "type": "int", "symmetric": True,
                             "group_size": None, **ACT_ARGS[layer.act]}.items()))
    if is_int:
        weights = _args(fmt.bits, "int", symmetric, strategy, group_size)
        return Scheme("pack-quantized" if acts is None else "int-quantized", weights, acts)
    weights = _args(8, "float", True, strategy, group_size)
    return Scheme("naive-quantized" if acts is None else "float-quantized", weights, acts)


def _signed(q: QTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes (int16) and zero points (int16 or None) in the signed domain of the format's
    bits: unsigned codes u become u - 2^(bits-1); a uint weight without zero point gets the
    zero point -2^(bits-1)."""
    fmt = q.format
    codes = q.codes.to(torch.int16)
    zp = None if q.zero_point is None else q.zero_point.to(torch.int16)
    if not fmt.signed:
        off = 1 << (fmt.bits - 1)
        codes = codes - off
        zp = (torch.zeros(q.layout.scale_shape, dtype=torch.int16) if zp is None else zp) - off
    return codes, zp


def _scale(q: QTensor, strategy: str, dtype: torch.dtype, where: str) -> torch.Tensor:
    n = q.shape[0]
    s = q.scale.float()
    s = s.reshape(1) if strategy == "tensor" else s.reshape(n, -1)
    out = s.to(dtype)
    if dtype != torch.float32:
        back = out.float()
        err = ((back - s).abs() / s.abs().clamp_min(1e-38)).max() if s.numel() else 0.0
        if not bool(torch.isfinite(back).all()) or float(err) > ROUND_ERROR[dtype]:
            raise ValueError(f"{where}: a scale does not survive rounding to {dtype} "
                             f"(relative error {float(err):.3g}); export with dtype='float32'")
    return out.contiguous()


def layer_tensors(name: str, layer: QuantLinear, q: QTensor, scheme: Scheme,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of one layer in ``scheme``'s storage format."""
    w = dict(scheme.weights)
    out: dict[str, torch.Tensor] = {f"{name}.weight_scale": _scale(q, w["strategy"], dtype, name)}
    if w["type"] == "float":
        out[f"{name}.weight"] = q.codes.contiguous().view(torch.float8_e4m3fn)
    else:
        bits = w["num_bits"]
        codes, zp = _signed(q)
        if scheme.format == "pack-quantized":
            off = 1 << (bits - 1)
            out[f"{name}.weight_packed"] = pack_int32((codes + off).to(torch.uint8), bits, dim=1)
            out[f"{name}.weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
            if zp is not None:
                z = (zp.reshape(q.shape[0], -1) + off).to(torch.uint8)
                out[f"{name}.weight_zero_point"] = pack_int32(z, bits, dim=0)
        else:
            out[f"{name}.weight"] = codes.to(torch.int8).contiguous()
            if zp is not None:
                out[f"{name}.weight_zero_point"] = zp.reshape(q.shape[0], -1).to(torch.int8)
    if layer.act == "int8_static":
        out[f"{name}.input_scale"] = layer.act_scale.float().reshape(1).to(dtype).clone()
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().to(dtype).clone()
    return out


def _other_quantized(model: nn.Module) -> list[str]:
    """qkern modules other than QuantLinear (QuantEmbedding, QuantConv, online rotations...)
    that hold packed buffers the format has no place for."""
    quant = quantized_layers(model)
    bad = []
    for n, m in model.named_modules():
        inside = any(n.startswith(f"{q}.") for q in quant)
        if (type(m).__module__.startswith("qkern.") and not isinstance(m, QuantLinear)
                and not inside):
            bad.append(f"{n or '<model>'} ({type(m).__name__})")
    return bad


def _not_linear_in_transformers(model: nn.Module, names: list[str]) -> list[str]:
    """Quantized layers that the model's own transformers class builds as something other
    than nn.Linear (GPT-2's Conv1D, stored transposed): compressed-tensors quantizes Linear
    modules, so a consumer would find no place for them. The class is rebuilt on the meta
    device from the model's config (no memory, no weights)."""
    build = getattr(type(model), "_from_config", None)
    if build is None:
        return []
    with torch.device("meta"):
        fresh = build(copy.deepcopy(model.config))
    bad = []
    for n in names:
        try:
            kind = type(fresh.get_submodule(n))
        except AttributeError:
            bad.append(f"{n}: the transformers class has no module of this name")
            continue
        if not issubclass(kind, nn.Linear):
            bad.append(f"{n}: transformers builds it as {kind.__name__}, and "
                       "compressed-tensors quantizes Linear layers only")
    return bad


def build_config(model: nn.Module, cfg: dict, schemes: dict[str, Scheme],
                 dtype: torch.dtype) -> dict:
    """config.json: the transformers config with the quantization_config llm-compressor
    writes. One scheme: targets ["Linear"] with every float Linear in ``ignore``; several:
    each config group targets its layers by name."""
    cfg = dict(cfg)
    float_linears = sorted(n for n, m in model.named_modules()
                           if isinstance(m, nn.Linear) and n not in schemes)
    by_scheme: dict[Scheme, list[str]] = {}
    for name, s in schemes.items():
        by_scheme.setdefault(s, []).append(name)
    ordered = sorted(by_scheme, key=lambda s: -len(by_scheme[s]))
    groups = {}
    for i, s in enumerate(ordered):
        groups[f"group_{i}"] = s.as_json(["Linear"] if len(ordered) == 1 else by_scheme[s])
    formats = {s.format for s in ordered}
    cfg["quantization_config"] = {
        "config_groups": groups,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "global_compression_ratio": None, "ignore": float_linears, "kv_cache_scheme": None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": CT_VERSION}
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    cfg["dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"] = name[dtype]
    return cfg


@register
class CompressedTensors(Format):
    """``qkern.export(model, out, format="compressed-tensors", dtype="float32",
    overwrite=False, tokenizer=None)``; ``qkern.from_pretrained(folder)`` of such a folder."""

    name = "compressed-tensors"

    def write(self, model: nn.Module, out: Path, dtype: str = "float32",
              overwrite: bool = False, tokenizer=None) -> Path:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dt = DTYPES[dtype]
        cfg = hf_config(model, self.name)  # a transformers model, before any work
        other = _other_quantized(model)
        if other:
            raise ValueError("compressed-tensors export cannot hold these quantized modules "
                             "(only QuantLinear layers have a scheme):\n  " + "\n  ".join(other))
        reasons: dict[str, Scheme] = {}

        def why_not(name: str, layer: QuantLinear, q: QTensor) -> str | None:
            s = layer_scheme(layer, q)
            if isinstance(s, str):
                return s
            reasons[name] = s
            return None

        qts = check_layers(model, "compressed-tensors", why_not)
        bad = _not_linear_in_transformers(model, list(qts))
        if bad:
            raise ValueError("compressed-tensors export cannot hold these layers:\n  "
                             + "\n  ".join(bad[:8]))
        layers = quantized_layers(model)
        tensors = {k: (v.detach().to(dt) if v.is_floating_point() else v.detach()).clone()
                   for k, v in float_tensors(model).items()
                   if k.rpartition(".")[0] not in layers}
        tensors = {k: v.cpu() for k, v in tensors.items()}
        for name, q in qts.items():
            q = replace(q, codes=q.codes.cpu(), scale=q.scale.cpu(),
                        zero_point=None if q.zero_point is None else q.zero_point.cpu())
            found = layer_tensors(name, layers[name], q, reasons[name], dt)
            tensors.update({k: v.cpu() for k, v in found.items()})
        config = build_config(model, cfg, reasons, dt)

        def fill(tmp: Path) -> None:
            write_tensors(tmp / "model.safetensors", tensors)
            write_json(tmp / "config.json", config)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))

        return write_folder(out, fill, overwrite)

    def detect(self, path: Path) -> bool:
        cfg = Path(path) / "config.json"
        if not cfg.is_file():
            return False
        try:
            qc = json.loads(cfg.read_text()).get("quantization_config") or {}
        except (ValueError, UnicodeDecodeError):
            return False
        return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"

    def load(self, path: Path, **options) -> nn.Module:
        return load_folder(Path(path), **options)

