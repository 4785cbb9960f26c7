"""The float model of a checkpoint folder without its weights, filled a module at a time.

:func:`skeleton` builds the transformers model of a folder's ``config.json`` with every
parameter on the meta device (no memory) and every buffer real: the non-persistent buffers a
model computes in ``__init__`` (the rotary ``inv_freq``) are not in the checkpoint, so they
are kept as built (a plain ``with torch.device("meta")`` would leave them meta, without
values). :func:`load_params` fills a module's parameters from a :class:`Checkpoint`;
:func:`free_params` sends them back to meta.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..interop._common import hf_skeleton
from ..io.shards import Checkpoint

__all__ = ["free_params", "load_params", "load_on_call", "parameters_on_meta", "skeleton"]


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device as it is registered (its
    initialization then costs nothing); buffers stay where they are made."""
    old = nn.Module.register_parameter

    def register(self, name, param):
        old(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = old


def skeleton(model_dir: str | Path) -> nn.Module:
    """The float32 transformers model of ``model_dir/config.json`` (eval mode), parameters on
    the meta device, buffers real. ValueError for an already quantized checkpoint."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{model_dir}: not a model folder (no config.json)")
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config")
    except ValueError as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise ValueError(f"{model_dir}: an already quantized checkpoint ({method!r}); "
                         "quantize_pretrained takes a float model folder")
    with parameters_on_meta():
        model = hf_skeleton(Path(model_dir), "quantize_pretrained")
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # as from_pretrained does: a tied LM head is the embedding
    return model


def _owner(mod: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (mod.get_submodule(parent) if parent else mod), leaf


def load_params(mod: nn.Module, prefix: str, ckpt: Checkpoint, recurse: bool = True) -> int:
    """Fills ``mod``'s parameters (and its persistent buffers that ``ckpt`` holds) from
    ``ckpt``, key ``prefix + name``; float tensors become float32 (as ``from_pretrained(...,
    dtype=torch.float32)`` converts them). Returns the bytes loaded. ValueError naming the
    tensor when the checkpoint lacks it or its shape differs."""
    n = 0
    for name, p in list(mod.named_parameters(recurse=recurse, remove_duplicate=False)):
        t = _read(ckpt, prefix + name, tuple(p.shape))
        owner, leaf = _owner(mod, name)
        owner._parameters[leaf] = nn.Parameter(t, requires_grad=p.requires_grad)
        n += t.numel() * t.element_size()
    for name, b in list(mod.named_buffers(recurse=recurse, remove_duplicate=False)):
        owner, leaf = _owner(mod, name)
        if leaf in owner._non_persistent_buffers_set or prefix + name not in ckpt:
            continue
        owner._buffers[leaf] = _read(ckpt, prefix + name, tuple(b.shape))
    return n


def _read(ckpt: Checkpoint, key: str, shape: tuple) -> torch.Tensor:
    if key not in ckpt:
        raise ValueError(f"{ckpt.folder}: the checkpoint has no tensor {key!r}, which the "
                         "model of its config.json needs (renamed or fused keys are not "
                         "supported here; load it with qkern.models.load_pretrained)")
    t = ckpt.read(key)
    if tuple(t.shape) != shape:
        raise ValueError(f"{ckpt.folder}: tensor {key!r} is {tuple(t.shape)}, the model "
                         f"expects {shape}")
    return t.float() if t.is_floating_point() else t


def free_params(mod: nn.Module, recurse: bool = True) -> None:
    """``mod``'s parameters back on the meta device (their memory freed)."""
    for name, p in list(mod.named_parameters(recurse=recurse, remove_duplicate=False)):
        owner, leaf = _owner(mod, name)
        owner._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)


def load_on_call(model: nn.Module, skip: str, ckpt: Checkpoint) -> list:
    """Forward pre-hooks on the modules of ``model`` outside ``skip`` (the blocks' list name)
    that hold parameters of their own: each loads them from ``ckpt`` when the module first
    runs. Capturing block 0's inputs then reads the embeddings only (never the LM head).
    Returns the hook handles; :func:`free_params` of ``model`` undoes the loads."""
    handles = []
    for name, m in model.named_modules():
        if name == skip or name.startswith(skip + "."):
            continue
        if not any(p.device.type == "meta" for p in m.parameters(recurse=False)):
            continue

        def pre(mod, args, prefix=f"{name}." if name else ""):
            if any(p.device.type == "meta" for p in mod.parameters(recurse=False)):
                load_params(mod, prefix, ckpt, recurse=False)

        handles.append(m.register_forward_pre_hook(pre))
    return handles
