"""Transformer blocks as the sequential LLM pipeline sees them (public):

- :func:`find_blocks`: the repeated blocks of a model (Llama / Mistral / Qwen2 / Qwen3, OPT,
  GPT-2, BERT from transformers, and qkern's own ``models.llama`` / ``models.bert``);
- :func:`block_linears`: the weight layers of a block (``nn.Linear`` and transformers'
  ``Conv1D``), and :func:`conv1d_to_linear` / :func:`linearize_conv1d` (GPT-2's Conv1D holds
  its weight transposed: it becomes an equivalent ``nn.Linear`` before quantization);
- :func:`sequential_groups`: the true-sequential order inside a block (layers reading the
  same input tensor form a group: q/k/v, then o, then gate/up, then down);
- :func:`scale_pairs` / :func:`fold_scales`: the (preceding op, following linears) pairs where
  a per-input-channel scale can be folded (norm -> q/k/v, v -> o, norm -> gate/up,
  up -> down, by architecture), as AWQ and SmoothQuant need.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .calibration import call_model
from .registry import Batch, replace_module

__all__ = ["SCALE_PAIRS", "block_linears", "conv1d_to_linear", "find_blocks", "fold_scales",
           "is_conv1d", "is_norm", "linearize_conv1d", "scale_pairs", "sequential_groups"]


def is_conv1d(mod: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x @ W + b`` with W (in, out)."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and mod.weight.dim() == 2


def conv1d_to_linear(mod: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what a transformers ``Conv1D`` computes (weight copied,
    transposed to (out, in))."""
    w = mod.weight.detach()
    lin = nn.Linear(w.shape[0], w.shape[1], bias=mod.bias is not None,
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.t())
        if mod.bias is not None:
            lin.bias.copy_(mod.bias.detach())
    return lin


def linearize_conv1d(model: nn.Module) -> list[str]:
    """Replaces every transformers ``Conv1D`` of ``model`` by its ``nn.Linear`` (in place);
    returns their names."""
    names = [n for n, m in model.named_modules() if n and is_conv1d(m)]
    for n in names:
        replace_module(model, n, conv1d_to_linear(model.get_submodule(n)))
    return names


def _weight_count(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


def block_linears(block: nn.Module) -> list[str]:
    """Names (relative to ``block``) of its ``nn.Linear`` / ``Conv1D`` layers."""
    return [n for n, m in block.named_modules()
            if n and (type(m) is nn.Linear or is_conv1d(m))]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(name, blocks)``: the ``nn.ModuleList`` of identical blocks holding most of the
    model's weights (``model.layers``, ``model.decoder.layers``, ``transformer.h``,
    ``encoder.layer`` ...). Raises ValueError when the model has none."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(b) for b in mod}
        if len(kinds) != 1 or not block_linears(mod[0]):
            continue
        size = _weight_count(mod)
        if best is None or size > best[2]:
            best = (name, mod, size)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no transformer blocks recognized (an "
                         "nn.ModuleList of identical blocks holding Linear layers); the "
                         "sequential LLM methods need one. Use WeightOnlyConfig for other "
                         "models")
    return best[0], best[1]


def sequential_groups(block: nn.Module, batch: Batch, names: Sequence[str]) -> list[list[str]]:
    """``names`` (linears of ``block``) in the order they run on ``batch``, grouped: layers
    that read the very same input tensor (q/k/v, gate/up) form one group. Layers that do not
    run come last, one group each."""
    order: list[tuple[str, torch.Tensor]] = []  # the tensors are kept: ids stay unique
    handles = []
    for n in names:
        def hook(mod, args, n=n):
            if not any(n == o[0] for o in order):
                order.append((n, args[0]))
        handles.append(block.get_submodule(n).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_model(block, batch)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for n, key in order:
        if groups and key is last:
            groups[-1].append(n)
        else:
            groups.append([n])
        last = key
    ran = {n for n, _ in order}
    return groups + [[n] for n in names if n not in ran]


#: (preceding op, following linears) per architecture, names relative to a block. A pair is
#: used when every name exists, the linears are plain Linear layers reading the op's output
#: width, and (for a linear predecessor) its output width equals their input width (so grouped
#: KV heads, where v_proj is narrower than o_proj's input, are left out).
SCALE_PAIRS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Llama / Mistral / Qwen2 / Qwen3 (transformers) and qkern.models.llama
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
    # OPT (ReLU between fc1 and fc2 commutes with a positive scale)
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.out_proj",)),
    ("final_layer_norm", ("fc1",)),
    ("fc1", ("fc2",)),
    # GPT-2 (after Conv1D -> Linear)
    ("ln_1", ("attn.c_attn",)),
    ("ln_2", ("mlp.c_fc",)),
    # BERT (post-norm: its LayerNorms also feed the residual, so only value -> output)
    ("attention.self.value", ("attention.output.dense",)),
)


def is_norm(mod: nn.Module) -> bool:
    """A LayerNorm / RMSNorm-like module: an elementwise 1-D ``weight`` (and maybe ``bias``)
    applied last, so a per-channel scale can be folded into it."""
    w = getattr(mod, "weight", None)
    return (isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm")) and \
        isinstance(w, torch.Tensor) and w.dim() == 1


def _relu_between(block: nn.Module, prev: str) -> bool:
    """OPT's fc1 -> fc2 pair holds only when the activation is ReLU (positive-homogeneous)."""
    if prev != "fc1":
        return True
    act = getattr(block, "activation_fn", None)
    return isinstance(act, nn.ReLU)


def scale_pairs(block: nn.Module) -> list[tuple[str, list[str]]]:
    """The pairs of :data:`SCALE_PAIRS` that apply to ``block`` (after Conv1D -> Linear)."""
    mods = dict(block.named_modules())
    out = []
    for prev, nexts in SCALE_PAIRS:
        if prev not in mods or any(n not in mods for n in nexts):
            continue
        p, ls = mods[prev], [mods[n] for n in nexts]
        if not all(type(m) is nn.Linear for m in ls):
            continue
        width = {m.in_features for m in ls}
        if len(width) != 1:
            continue
        k = width.pop()
        if type(p) is nn.Linear:
            if p.out_features != k or not _relu_between(block, prev):
                continue
        elif not (is_norm(p) and p.weight.numel() == k):
            continue
        out.append((prev, list(nexts)))
    return out


def fold_scales(block: nn.Module, prev: str, nexts: Sequence[str], s: torch.Tensor) -> None:
    """Divides the output channels of ``prev`` (a norm's weight and bias, or a Linear's rows)
    by ``s`` (K,) and multiplies the input columns of each linear in ``nexts`` by it: the
    block computes the same function (in exact arithmetic)."""
    s = s.detach().to(torch.float64)
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"{prev}: fold scales must be finite and positive")
    p = block.get_submodule(prev)
    with torch.no_grad():
        for t in (p.weight, getattr(p, "bias", None)):
            if t is not None:
                shape = (-1,) if t.dim() == 1 else (-1, 1)
                t.copy_((t.double() / s.reshape(shape)).to(t.dtype))
        for n in nexts:
            w = block.get_submodule(n).weight
            w.copy_((w.double() * s.reshape(1, -1)).to(w.dtype))
