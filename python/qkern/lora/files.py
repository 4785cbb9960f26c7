"""LoRA adapters on their own in a safetensors file (written atomically): ``<layer>.lora_A``,
``<layer>.lora_B`` and, in the metadata, each layer's rank, alpha and shape; the base model is
not in the file."""

from __future__ import annotations

import copy
import json
import math
import os

import torch
from torch import nn

from ..io.safetensors import read_safetensors, write_safetensors
from ..nn import QuantLinear
from .layer import LoRAConfig, LoRALinear, lora_layers, wrap_layers

__all__ = ["ADAPTER_FORMAT", "load_adapters", "save_adapters"]

ADAPTER_FORMAT = "qkern-lora-1"


def save_adapters(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Writes the LoRA adapters of ``model`` (and nothing of its base) to ``path``. Refuses an
    existing path unless ``overwrite=True``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers (apply_lora adds them)")
    tensors, spec = {}, {}
    for name, m in layers.items():
        tensors[f"{name}.lora_A"] = m.lora_A.detach().float()
        tensors[f"{name}.lora_B"] = m.lora_B.detach().float()
        spec[name] = {"rank": m.rank, "alpha": m.alpha, "in": m.in_features,
                      "out": m.out_features}
    write_safetensors(path, tensors, {"format": ADAPTER_FORMAT, "qkern_lora": json.dumps(spec)},
                      overwrite=overwrite)


def _read(path) -> tuple[dict, dict[str, dict]]:
    tensors, meta = read_safetensors(path, with_metadata=True)
    if meta.get("format") != ADAPTER_FORMAT or "qkern_lora" not in meta:
        raise ValueError(f"{path}: not a qkern LoRA adapter file (format "
                         f"{meta.get('format')!r}, expected {ADAPTER_FORMAT!r})")
    try:
        spec = json.loads(meta["qkern_lora"])
        for name, s in spec.items():
            r, a, k, n = int(s["rank"]), float(s["alpha"]), int(s["in"]), int(s["out"])
            if r < 1 or k < 1 or n < 1 or not math.isfinite(a) or a <= 0:
                raise ValueError(f"layer {name}: bad rank/alpha/shape {s}")
            spec[name] = {"rank": r, "alpha": a, "in": k, "out": n}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: damaged LoRA metadata ({e})") from None
    want = {f"{n}.lora_{ab}" for n in spec for ab in "AB"}
    if set(tensors) != want:
        extra, missing = sorted(set(tensors) - want), sorted(want - set(tensors))
        raise ValueError(f"{path}: tensors do not match the metadata (missing {missing[:4]}, "
                         f"unexpected {extra[:4]})")
    for name, s in spec.items():
        for ab, shape in (("A", (s["rank"], s["in"])), ("B", (s["out"], s["rank"]))):
            t = tensors[f"{name}.lora_{ab}"]
            if tuple(t.shape) != shape or not t.is_floating_point():
                raise ValueError(f"{path}: {name}.lora_{ab} is {t.dtype} "
                                 f"{tuple(t.shape)}, its metadata says float {shape}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path}: {name}.lora_{ab} has non-finite values")
    return tensors, spec


def _check_layer(path, name: str, m: nn.Module, s: dict) -> None:
    if not isinstance(m, (LoRALinear, QuantLinear, nn.Linear)):
        raise ValueError(f"{path}: layer {name} is a {type(m).__name__}, not a LoRA, "
                         "QuantLinear or nn.Linear layer")
    if m.in_features != s["in"] or m.out_features != s["out"]:
        raise ValueError(f"{path}: layer {name} is ({m.out_features}, {m.in_features}) in "
                         f"the model, ({s['out']}, {s['in']}) in the adapter file")
    if isinstance(m, LoRALinear) and (m.rank != s["rank"] or m.alpha != s["alpha"]):
        raise ValueError(f"{path}: layer {name} has rank {m.rank}, alpha {m.alpha:g} in the "
                         f"model, rank {s['rank']}, alpha {s['alpha']:g} in the adapter file")


def load_adapters(model: nn.Module, path: str | os.PathLike, inplace: bool = False
                  ) -> nn.Module:
    """``model`` with the adapters of ``path``: a model that has LoRA layers must have
    exactly the file's layers, ranks, alphas and shapes (else ValueError naming the layer); a
    model without any gets them first (``apply_lora`` on the file's layers). The model is
    copied unless ``inplace=True``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    tensors, spec = _read(path)
    have = lora_layers(model)
    if have and set(have) != set(spec):
        extra, missing = sorted(set(have) - set(spec)), sorted(set(spec) - set(have))
        raise ValueError(f"{path}: the model's LoRA layers differ from the file's (only in the "
                         f"model: {extra[:4]}, only in the file: {missing[:4]})")
    mods = dict(model.named_modules())
    for name, s in spec.items():
        if name not in mods:
            raise ValueError(f"{path}: the model has no layer {name!r}")
        _check_layer(path, name, mods[name], s)
    out = model if inplace else copy.deepcopy(model)
    if not have:  # ranks and alphas may differ between layers
        wrap_layers(out, {n: LoRAConfig(rank=s["rank"], alpha=s["alpha"])
                          for n, s in spec.items()})
    layers = lora_layers(out)
    with torch.no_grad():
        for name in spec:
            m = layers[name]
            m.lora_A.copy_(tensors[f"{name}.lora_A"])
            m.lora_B.copy_(tensors[f"{name}.lora_B"])
    return out
