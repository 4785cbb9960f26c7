"""What the GPTQ and AWQ formats share ("W{n}A16": integer weight codes with float16 group
scales and integer zero points, activations in float): qkern's QTensor as unsigned codes and
zero points, float16 scales, 32-bit word packing, and building a transformers model whose
linear layers are QuantLinear from such a checkpoint.

Both formats store, per group of ``G`` consecutive input features of an output channel, an
unsigned code ``u`` in ``[0, 2^bits)``, an integer zero point ``z`` and a float16 scale ``s``:
the weight is ``(u - z) * s``. qkern's ``int{b}`` codes ``c`` (``[qmin, qmax]``, ``qmin =
-2^(b-1)``) with zero point ``zp`` (None when symmetric: ``zp = 0``) are ``u = c - qmin``,
``z = zp - qmin``; its ``uint{b}`` codes are ``u = c``, ``z = zp``. Both maps are exact;
only the scales change: qkern keeps float32 scales, the formats float16 (see
:func:`half_scales`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .. import formats as QF
from ..layout import Layout
from ..nn import QuantLinear
from ..tensor import QTensor
from ._common import hf_skeleton, quantized_layers

__all__ = ["FP16_MAX", "FP16_MIN_NORMAL", "IntWeight", "build_model", "check_weight_only",
           "common_group_size", "float_linears_in_blocks", "fp16_scales", "half_scales",
           "int_weight", "pack_int32", "read_config", "to_qtensor",
           "unpack_int32"]

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14


@dataclass
class IntWeight:
    """A weight (out N, in K) as the formats hold it: ``u`` (N, K) int32 codes in
    ``[0, 2^bits)``, ``z`` (N, K // group) int32 zero points, ``scale`` (N, K // group)
    float32, ``group`` the group size along K (K when one group per row), ``sym`` whether qkern
    stored no zero point."""

    u: torch.Tensor
    z: torch.Tensor
    scale: torch.Tensor
    bits: int
    group: int
    sym: bool
    signed: bool


def int_weight(q: QTensor, bits_allowed: tuple[int, ...]) -> IntWeight | str:
    """``q`` as unsigned codes and zero points (module docstring), or why it cannot be."""
    f = q.format
    if f.kind != "int":
        return f"format {f.name} is not an integer grid (GPTQ/AWQ store integer codes)"
    if f.bits not in bits_allowed:
        return (f"{f.bits}-bit codes ({f.name}); the format stores "
                + "/".join(map(str, bits_allowed)) + "-bit codes")
    if q.quantizer != "midtread":
        return f"the {q.quantizer} quantizer's half-step offset has no place in the format"
    if q.double_quant is not None:
        return "double-quantized scales (the format stores float16 scales)"
    if q.zero_point is not None and q.zero_point.is_floating_point():
        return ("float zero points (HQQ): the format stores integer zero points; "
                "quantize with integer zero points (e.g. RTN/GPTQ/AWQ, sym=False)")
    if len(q.shape) != 2:
        return f"weight of shape {tuple(q.shape)} is not 2-D"
    n, k = q.shape
    lay = q.layout
    if lay.granularity == "group" and lay.axis == 1:
        g = lay.group_size
    elif lay.granularity == "channel" and lay.axis == 0:
        g = k
    else:
        return f"{lay.granularity} scales along axis {lay.axis} (the format groups the input dim)"
    u = q.codes.cpu().to(torch.int32) - f.qmin
    scale = q.scale.cpu().float().reshape(n, k // g)
    if q.zero_point is None:
        z = torch.full((n, k // g), -f.qmin, dtype=torch.int32)
    else:
        z = q.zero_point.cpu().to(torch.int32).reshape(n, k // g) - f.qmin
    return IntWeight(u, z, scale, f.bits, g, q.zero_point is None, f.signed)


def half_scales(scale: torch.Tensor, exact: bool) -> tuple[torch.Tensor, str | None]:
    """``scale`` as float16 (round to nearest even) and None, or why not: a scale above
    float16's largest finite value 65504, a nonzero one below its smallest normal 2^-14 (the
    relative error of a subnormal exceeds 2^-11), or, with ``exact``, any scale that float16
    does not hold exactly. Within the normal range the rounding moves each weight ``(u - z) *
    s`` by at most 2^-11 of its magnitude."""
    a = scale.float().abs()
    h = scale.half()
    if not bool(torch.isfinite(scale).all()):
        return h, "a scale is NaN or infinite"
    if bool((a > FP16_MAX).any()):
        return h, f"a scale {float(a.max()):.6g} exceeds float16's largest value {FP16_MAX}"
    tiny = (a > 0) & (a < FP16_MIN_NORMAL) & (h.float() != scale.float())
    if bool(tiny.any()):
        return h, (f"a scale {float(a[tiny].min()):.3g} lies below float16's normal range "
                   f"(2^-14) and would lose more than 2^-11 of its value")
    if exact and bool((h.float() != scale.float()).any()):
        bad = int((h.float() != scale.float()).sum())
        return h, (f"{bad} float32 scales are not float16 numbers (exact=True); "
                   "qkern.interop.wna16.fp16_scales(model) rounds them first")
    return h, None


def fp16_scales(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose QuantLinear scales are rounded to float16 (round to nearest
    even; the codes and zero points kept): the model a GPTQ / AWQ export of ``model`` holds,
    bit for bit. ValueError for a scale float16 cannot hold (:func:`half_scales`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    out = copy.deepcopy(model)
    for name, m in quantized_layers(out).items():
        permuted = hasattr(m, "permuted_weight")  # a GPTQ act-order layer: its sorted weight
        q, order = m.permuted_weight() if permuted else (m.quantized_weight(), None)
        h, why = half_scales(q.scale, exact=False)
        if why is not None:
            raise ValueError(f"{name}: {why}")
        q = replace(q, scale=h.float())
        if permuted:
            new = type(m)(q, m.bias, order)
        else:
            new = QuantLinear(q, m.bias, act=m.act, mode=m.mode,
                              act_scale=getattr(m, "act_scale", None),
                              threshold=getattr(m, "outlier_threshold", None))
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, new)
    return out


def common_group_size(weights: dict[str, IntWeight], shapes: dict[str, tuple[int, int]],
                      fmt: str, per_row: bool) -> int:
    """The one ``group_size`` every layer admits (``per_row``: -1, one group per row, is a
    choice too), else ValueError listing the layers' (group size, in_features)."""
    choices: set[int] | None = None
    for name, w in weights.items():
        k = shapes[name][1]
        ok = {w.group} | ({-1} if per_row and w.group == k else set())
        choices = ok if choices is None else choices & ok
    if not choices:
        sizes = sorted({(w.group, shapes[n][1]) for n, w in weights.items()})
        raise ValueError(f"{fmt} export: the format states one group_size for all layers, but "
                         "the layers have (group size, in_features) " + ", ".join(
                             f"({g}, {k})" for g, k in sizes[:8]) +
                         "; quantize with a group_size that divides every in_features")
    return -1 if -1 in choices else max(choices)


def check_weight_only(model: nn.Module, fmt: str) -> None:
    """ValueError naming what a weight-only integer format (activations in float, the plain
    transformers modules around the quantized linears) cannot hold: QuantLinear layers that
    quantize their activations, and other qkern modules (activation quantizers, Hadamard
    rotations, run-time weight quantization, quantized embeddings / convolutions), which the
    format's loaders would not run, so the served model would compute something else."""
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            if m.act != "none":
                bad.append(f"{name}: activations quantized (act={m.act!r}); {fmt} is "
                           "weight-only (activations in float)")
        elif type(m).__module__.startswith("qkern."):
            bad.append(f"{name or '<model>'}: a qkern {type(m).__name__}, which {fmt} "
                       "loaders would not run")
    if bad:
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        raise ValueError(f"{fmt} export cannot hold these modules:\n  " + "\n  ".join(bad[:8])
                         + more)


def float_linears_in_blocks(model: nn.Module, quantized: set[str]) -> list[str]:
    """The float nn.Linear layers inside the blocks (``<...>.<index>``, e.g.
    ``model.layers.3``) that hold quantized layers: GPTQ loaders take every linear of a block
    as quantized unless the config says otherwise."""
    def block(name: str) -> str | None:
        parts = name.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        return None if idx is None else ".".join(parts[: idx + 1])

    blocks = {block(n) for n in quantized} - {None}
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and block(n) in blocks]


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Values in ``[0, 2^bits)`` packed into int32 words along ``dim``, LSB first: value ``j``
    occupies bits ``[bits*j, bits*(j+1))`` of the stream of 32-bit words (for 3 bits, 32
    values fill 3 words and values 10 and 21 straddle two). ``values.shape[dim]`` must be a
    multiple of ``32 / gcd(32, bits)``."""
    v = values.movedim(dim, -1).to(torch.int64)
    n = v.shape[-1]
    per, nw = 32 // _gcd(32, bits), bits // _gcd(32, bits)  # values and words per unit
    if n % per:
        raise ValueError(f"pack_int32: {n} values along dim {dim} are not a multiple of {per}")
    v = v.reshape(*v.shape[:-1], n // per, per)
    words = torch.zeros(*v.shape[:-1], nw, dtype=torch.int64, device=v.device)
    for j in range(per):
        w, b = divmod(bits * j, 32)
        words[..., w] |= (v[..., j] << b) & 0xFFFFFFFF
        if b + bits > 32:  # the value's high bits start the next word
            words[..., w + 1] |= v[..., j] >> (32 - b)
    words = words.reshape(*words.shape[:-2], -1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of :func:`pack_int32`: int32 words -> int32 values in ``[0, 2^bits)``."""
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    m = w.shape[-1]
    per, nw = 32 // _gcd(32, bits), bits // _gcd(32, bits)
    if m % nw:
        raise ValueError(f"unpack_int32: {m} words along dim {dim} do not hold whole "
                         f"{bits}-bit values")
    w = w.reshape(*w.shape[:-1], m // nw, nw)
    out = torch.empty(*w.shape[:-1], per, dtype=torch.int64, device=w.device)
    mask = (1 << bits) - 1
    for j in range(per):
        i, b = divmod(bits * j, 32)
        val = w[..., i] >> b
        if b + bits > 32:
            val = val | (w[..., i + 1] << (32 - b))
        out[..., j] = val & mask
    out = out.reshape(*out.shape[:-2], -1).to(torch.int32)
    return out.movedim(-1, dim).contiguous()


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def to_qtensor(name: str, u: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, bits: int,
               group: int) -> QTensor:
    """qkern's ``int{bits}`` QTensor of unsigned codes ``u`` (N, K), zero points ``z``
    (N, K // group) and scales (N, K // group): ``c = u + qmin``, ``zp = z + qmin`` (no zero
    point when every ``z`` is ``2^(bits-1)``: symmetric). ValueError (naming ``name``) for a
    zero point outside ``[0, 2^bits)``, which qkern's grid cannot hold."""
    f = QF.get(f"int{bits}")
    n, k = u.shape
    if int(u.min()) < 0 or int(u.max()) >= 2 ** bits:
        raise ValueError(f"{name}: codes outside [0, {2 ** bits})")
    if z.numel() and (int(z.min()) < 0 or int(z.max()) >= 2 ** bits):
        raise ValueError(f"{name}: zero point {int(z.min())}..{int(z.max())} outside "
                         f"[0, {2 ** bits}): qkern's int{bits} grid cannot hold it")
    codes = (u + f.qmin).to(torch.int8)
    sym = bool((z == -f.qmin).all())
    zp = None if sym else (z + f.qmin).to(torch.int32)
    if group == k and (bits > 4 or k % 32):  # one scale per row: the channel layout
        lay = Layout("channel", (n, k), 0, k)
        return QTensor(codes, scale.float().reshape(n).clone(),
                       None if zp is None else zp.reshape(n), f, lay)
    lay = Layout("group", (n, k), 1, group)
    return QTensor(codes, scale.float().reshape(n, k // group).clone(),
                   None if zp is None else zp.reshape(n, k // group), f, lay)


def read_config(path: Path) -> dict:
    """``config.json`` of the folder ``path`` (FileNotFoundError / ValueError when missing or
    not JSON)."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no config.json (a transformers model folder has one)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None


def build_model(path: Path, layers: dict[str, QuantLinear],
                tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The transformers model of ``path/config.json`` (without its quantization_config) in
    float32, its linear layers ``layers`` (by module name) replaced by the given QuantLinear,
    the other weights from ``tensors``; ValueError for a weight the checkpoint lacks or has in
    excess. Eval mode."""
    model = hf_skeleton(path, "loading a GPTQ/AWQ folder")
    config = model.config
    for name, layer in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: quantized layer {name} is not a module of "
                             f"{type(model).__name__}") from None
        if isinstance(old, nn.Linear):
            shape = (old.out_features, old.in_features)
        elif type(old).__name__ == "Conv1D" and hasattr(old, "nf"):  # GPT-2's (in, out) linear
            shape = (old.nf, old.weight.shape[0])
        else:
            raise ValueError(f"{path}: {name} is a {type(old).__name__}, not a Linear layer")
        if shape != (layer.out_features, layer.in_features):
            raise ValueError(f"{path}: {name} holds a ({layer.out_features}, "
                             f"{layer.in_features}) weight; the model's layer is {shape}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    floats = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    res = model.load_state_dict(floats, strict=False)
    quant_prefixes = tuple(f"{n}." for n in layers)
    missing = [k for k in res.missing_keys if not k.startswith(quant_prefixes)]
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} weights of "
                         f"{type(model).__name__}: {', '.join(missing[:6])}")
    if res.unexpected_keys:
        raise ValueError(f"{path}: {len(res.unexpected_keys)} tensors are no weight of "
                         f"{type(model).__name__}: {', '.join(res.unexpected_keys[:6])}")
    if getattr(config, "tie_word_embeddings", False) and "lm_head" not in layers:
        model.tie_weights()
    return model.eval()
