"""Import of compressed-tensors folders (``quant_method: "compressed-tensors"``, see
``compressed_tensors.py`` for the layout) onto qkern's kernels: the transformers model of
``config.json`` with every quantized Linear replaced by a QuantLinear holding the checkpoint's
codes, scales and zero points unchanged (int4 -> w4 kernel, int2/3 -> w23, int8 per channel
-> w8a16 / w8a8, fp8 -> fp8 kernel). What qkern cannot run exactly is refused with the reason.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .. import formats as QF
from ..layout import Layout
from ..models.llama import read_weights
from ..nn import QuantLinear
from ..nn.linear import MODES
from ..packing import unpack_int32
from ..tensor import QTensor
from ._common import hf_skeleton

__all__ = ["dense_packing", "load_folder", "scheme_for"]

WEIGHT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")
KNOWN_WEIGHT_ARGS = {"num_bits", "type", "symmetric", "group_size", "strategy", "dynamic",
                     "actorder", "block_structure", "observer", "observer_kwargs",
                     "scale_dtype", "zp_dtype"}


def _class_names(module: nn.Module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


def _match(name: str, module: nn.Module, target: str) -> int | None:
    """How specifically ``target`` matches (0 name, 1 regex, 2 class), None if not:
    compressed-tensors' rule ("re:" prefix: re.match on the name; else the exact name or a
    class name of the module)."""
    if target.startswith("re:"):
        return 1 if re.match(target[3:], name) else None
    if target == name:
        return 0
    return 2 if target in _class_names(module) else None


def scheme_for(name: str, module: nn.Module, groups: dict[str, dict],
               ignore: list[str]) -> dict | None:
    """The config group covering ``name`` (the most specific target wins), None when none
    does or ``ignore`` lists it."""
    if any(_match(name, module, t) is not None for t in ignore):
        return None
    best = None
    for g in groups.values():
        for t in g.get("targets") or []:
            rank = _match(name, module, t)
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, g)
    return None if best is None else best[1]


def _check_top(qc: dict, where: str) -> None:
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(f"{where}: quantization_status {status!r}: the weights are stored in "
                         "float (fake-quantized), not as codes; qkern imports 'compressed' "
                         "checkpoints only")
    for key, what in (("sparsity_config", "sparsity (2:4, bitmask)"),
                      ("transform_config", "online transforms (rotations)"),
                      ("kv_cache_scheme", "KV-cache quantization")):
        if qc.get(key):
            raise ValueError(f"{where}: {key} is set: qkern's kernels do not run {what}")


def _acts(g: dict, where: str, ignore_activations: bool) -> tuple[str, bool]:
    """(qkern act mode, needs input_scale) for a group's input_activations."""
    a = g.get("input_activations")
    if g.get("output_activations"):
        raise ValueError(f"{where}: output activation quantization is not supported by qkern")
    if not a:
        return "none", False
    ok = (a.get("type") == "int" and a.get("num_bits") == 8 and a.get("symmetric", True)
          and a.get("strategy") in ("token", "tensor"))
    if not ok:
        if ignore_activations:
            return "none", False
        raise ValueError(
            f"{where}: input activations {a} (qkern runs int8 symmetric per token or per tensor "
            "only); pass ignore_activations=True to load the weights exactly and run the "
            "activations in float32 instead")
    if a.get("strategy") == "token":
        if not a.get("dynamic"):
            raise ValueError(f"{where}: static per-token activation scales are not defined")
        return "int8_dynamic", False
    return ("int8_dynamic_tensor", False) if a.get("dynamic") else ("int8_static", True)


def _get(t: dict, key: str, where: str) -> torch.Tensor:
    if key not in t:
        raise ValueError(f"{where}: tensor {key!r} is missing")
    return t.pop(key)


def _scale(s: torch.Tensor, n: int, k: int, w: dict, where: str) -> tuple[torch.Tensor, int]:
    """The scale as float32 (n, groups) and the group size along in_features."""
    if not s.is_floating_point():
        raise ValueError(f"{where}: weight_scale has dtype {s.dtype}, expected a float")
    s = s.float()
    strategy = w.get("strategy")
    if strategy == "group":
        g = w.get("group_size")
        if not isinstance(g, int) or g <= 0 or k % g:
            raise ValueError(f"{where}: group_size {g} does not divide in_features {k}")
        return s.reshape(n, k // g), g
    if strategy == "channel":
        return s.reshape(n, 1), k
    if strategy == "tensor":
        return s.reshape(1, 1).expand(n, 1).contiguous(), k
    if strategy == "block" and w.get("type") == "float":
        bh, bw = w.get("block_structure") or (0, 0)
        if bh <= 0 or bw <= 0 or k % bw:
            raise ValueError(f"{where}: block {bh}x{bw} does not tile a {n}x{k} weight")
        rows = s.reshape(-(-n // bh), k // bw).repeat_interleave(bh, 0)[:n]
        return rows.contiguous(), bw
    raise ValueError(f"{where}: weight strategy {strategy!r} is not supported by qkern")


def dense_packing(version: str | None) -> bool:
    """Whether a checkpoint written by compressed-tensors ``version`` packs 1-8 bit codes
    densely (0.18 and later: each row one LSB-first bit stream cut into int32 words) rather
    than ``32 // bits`` codes per word (earlier releases; the same for 1, 2, 4 and 8 bits)."""
    nums = re.findall(r"\d+", version or "")
    if len(nums) < 2:
        return True  # no version: the current layout
    return (int(nums[0]), int(nums[1])) >= (0, 18)


def _unpack(packed: torch.Tensor, bits: int, n: int, dim: int, dense: bool) -> torch.Tensor:
    """Unsigned codes (int16) from int32 words along ``dim``."""
    if dense or 32 % bits == 0:
        return unpack_int32(packed, bits, n, dim=dim).to(torch.int16)
    per = 32 // bits  # legacy: code j in word j // per, at bit (j % per) * bits
    p = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    if p.shape[-1] * per < n:
        raise ValueError(f"{p.shape[-1]} words hold fewer than {n} codes of {bits} bits")
    j = torch.arange(n)
    codes = (p[..., j // per] >> ((j % per) * bits)) & ((1 << bits) - 1)
    return codes.to(torch.int16).movedim(-1, dim).contiguous()


def _codes(t: dict, name: str, fmt: str, w: dict, n: int, k: int, where: str,
           dense: bool = True):
    """Signed codes (int16, n x k) and signed zero points (int16 or None) of an int weight."""
    bits = w["num_bits"]
    off = 1 << (bits - 1)
    zp = t.pop(f"{name}.weight_zero_point", None)
    if fmt == "pack-quantized":
        shape = t.pop(f"{name}.weight_shape", None)
        if shape is not None and [int(v) for v in shape.reshape(-1)] != [n, k]:
            raise ValueError(f"{where}: weight_shape {shape.tolist()} is not the layer's "
                             f"{[n, k]}")
        packed = _get(t, f"{name}.weight_packed", where)
        words = -(-k * bits // 32) if dense else -(-k // (32 // bits))
        if packed.dtype != torch.int32 or packed.shape != (n, words):
            raise ValueError(f"{where}: weight_packed {packed.dtype} {tuple(packed.shape)} is "
                             f"not int32 ({n}, {words})")
        codes = _unpack(packed, bits, k, 1, dense) - off
        if zp is not None and not w.get("symmetric", True):
            zp = _unpack(zp.to(torch.int32), bits, n, 0, dense) - off
    else:
        codes = _get(t, f"{name}.weight", where)
        if codes.dtype not in (torch.int8, torch.int16, torch.int32) or codes.shape != (n, k):
            raise ValueError(f"{where}: weight {codes.dtype} {tuple(codes.shape)} is not "
                             f"integer ({n}, {k})")
        codes = codes.to(torch.int16)
        if int(codes.min()) < -off or int(codes.max()) >= off:
            raise ValueError(f"{where}: weight codes outside the int{bits} range")
        if zp is not None:
            zp = zp.to(torch.int16)
    if w.get("symmetric", True):
        if zp is not None and bool((zp != 0).any()):
            raise ValueError(f"{where}: a symmetric scheme with nonzero weight_zero_point")
        return codes, None
    if zp is None:
        raise ValueError(f"{where}: asymmetric scheme without weight_zero_point")
    if int(zp.min()) < -off or int(zp.max()) >= off:
        raise ValueError(f"{where}: zero points outside the int{bits} range")
    return codes, zp


def _qtensor(t: dict, name: str, fmt: str, w: dict, n: int, k: int, where: str,
             dense: bool = True) -> QTensor:
    """The layer's weight as a qkern QTensor with the same values: signed codes -> int{b}
    (symmetric) or uint{b} with integer zero points (asymmetric), both exact integer shifts."""
    extra = set(w) - KNOWN_WEIGHT_ARGS
    if extra:
        raise ValueError(f"{where}: unknown weight arguments {sorted(extra)}")
    if w.get("dynamic"):
        raise ValueError(f"{where}: dynamic weight quantization is not a stored checkpoint")
    if w.get("actorder") == "group" or f"{name}.weight_g_idx" in t:
        raise ValueError(f"{where}: activation-order groups (g_idx) are not supported: qkern's "
                         "kernels store contiguous groups")
    scale, g = _scale(_get(t, f"{name}.weight_scale", where), n, k, w, where)
    if w.get("type") == "float":
        if w.get("num_bits") != 8 or fmt not in ("naive-quantized", "float-quantized"):
            raise ValueError(f"{where}: float weights of {w.get('num_bits')} bits in format "
                             f"{fmt!r} (qkern imports fp8 e4m3 only)")
        wt = _get(t, f"{name}.weight", where)
        if wt.dtype != torch.float8_e4m3fn or wt.shape != (n, k):
            raise ValueError(f"{where}: weight {wt.dtype} {tuple(wt.shape)} is not "
                             f"float8_e4m3fn ({n}, {k})")
        codes = wt.contiguous().view(torch.uint8)
        if bool(((codes & 0x7F) == 0x7F).any()):
            raise ValueError(f"{where}: fp8 weight holds NaN codes")
        f, zp = QF.get("fp8_e4m3"), None
    elif w.get("type") == "int" and isinstance(w.get("num_bits"), int) and \
            2 <= w["num_bits"] <= 8:
        bits = w["num_bits"]
        signed, zp = _codes(t, name, fmt, w, n, k, where, dense)
        off = 1 << (bits - 1)
        if zp is None:
            f, codes = QF.get(f"int{bits}"), signed.to(torch.int8)
        else:
            f, codes = QF.get(f"uint{bits}"), (signed + off).to(torch.uint8)
            zp = (zp.reshape(n, -1) + off).to(torch.int32)
    else:
        raise ValueError(f"{where}: weights {w.get('type')} of {w.get('num_bits')} bits are "
                         "not supported (int 2-8 bits, fp8)")
    if zp is not None and zp.shape != scale.shape:
        raise ValueError(f"{where}: weight_zero_point shape {tuple(zp.shape)} != scale "
                         f"{tuple(scale.shape)}")
    if g == k and f.name in ("int8", "fp8_e4m3"):  # one scale per row: the per-channel kernels
        return QTensor(codes, scale.reshape(n), zp if zp is None else zp.reshape(n), f,
                       Layout("channel", (n, k), 0, k))
    return QTensor(codes, scale, zp, f, Layout("group", (n, k), 1, g))


def load_folder(path: Path, ignore_activations: bool = False, mode: str = "exact") -> nn.Module:
    """The compressed-tensors checkpoint at ``path`` on qkern's kernels (float32, eval).
    ``ignore_activations=True`` loads weights of schemes whose activation quantization qkern
    does not run (fp8 activations) exactly and runs their activations in float32. ``mode``:
    the QuantLinear mode ("exact", or "fast" for the kernels that have one)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json")
    qc = json.loads(cfg_path.read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path}: not a compressed-tensors checkpoint (quant_method "
                         f"{qc.get('quant_method')!r})")
    _check_top(qc, str(path))
    groups, ignore = qc.get("config_groups") or {}, qc.get("ignore") or []
    dense = dense_packing(qc.get("version"))
    tensors = read_weights(path)
    model = hf_skeleton(path)
    done = 0
    for name, module in list(model.named_modules()):
        g = scheme_for(name, module, groups, ignore)
        if g is None or not (g.get("weights") or g.get("input_activations")):
            continue
        where = f"{path.name}: layer {name}"
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{where}: a quantized {type(module).__name__}: qkern imports "
                             "quantized Linear layers only")
        fmt = g.get("format") or qc.get("format")
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"{where}: format {fmt!r} is not supported (qkern imports "
                             f"{', '.join(WEIGHT_FORMATS)})")
        if not g.get("weights"):
            raise ValueError(f"{where}: activation-only quantization is not supported")
        act, needs_scale = _acts(g, where, ignore_activations)
        n, k = module.out_features, module.in_features
        q = _qtensor(tensors, name, fmt, g["weights"], n, k, where, dense)
        act_scale = None
        if needs_scale:
            act_scale = _get(tensors, f"{name}.input_scale", where).float().reshape(-1)[0]
        else:
            tensors.pop(f"{name}.input_scale", None)
            tensors.pop(f"{name}.input_zero_point", None)
        if act == "int8_dynamic" and not (q.format.name == "int8" and q.zero_point is None
                                          and q.granularity == "channel"):
            act = "int8_token"  # per-token int8 in front of the weight's own kernel
        bias = tensors.pop(f"{name}.bias", None)
        if (bias is None) != (module.bias is None):
            raise ValueError(f"{where}: bias {'missing' if bias is None else 'unexpected'}")
        try:
            layer = QuantLinear(q, None if bias is None else bias.float(), act=act,
                                mode=mode, act_scale=act_scale)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: qkern cannot run this scheme: {e}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        done += 1
    if not done:
        raise ValueError(f"{path}: no layer of the model matches the config groups' targets")
    _load_float(model, tensors, path)
    return model.eval()


def _load_float(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The remaining (float) tensors into the model; ValueError on unexpected or missing
    ones (a tied lm_head may be absent)."""
    state = model.state_dict()
    unexpected = sorted(k for k in tensors if k not in state)
    if unexpected:
        raise ValueError(f"{path}: tensors the model has no place for (a scheme qkern does not "
                         f"match?): {unexpected[:6]}")
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    missing = [k for k in state if k not in tensors and k.rpartition(".")[0] not in quant]
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing:
        raise ValueError(f"{path}: tensors missing from the checkpoint: {missing[:6]}")
    for k, v in tensors.items():
        if state[k].shape != v.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(state[k].shape)}")
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()}, strict=False)
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
