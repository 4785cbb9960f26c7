"""LoRA adapters beside frozen (quantized) Linear layers: the config, the layer, applying and
merging (QLoRA: Dettmers et al. 2023, over qkern's NF4 kernels)."""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .. import formats as QF
from ..nn import QuantLinear, notify_quantized
from ..quantization import BaseConfig, quantize_model

__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "lora_layers", "merge_lora",
           "quantized_like", "wrap_layers"]


def _fail(field: str, want: str, got) -> ValueError:
    return ValueError(f"LoRAConfig.{field} must be {want}, got {got!r}")


@dataclass(frozen=True)
class LoRAConfig:
    """Which layers get adapters and how large they are.

    ``rank``: r, the inner size of ``B A`` (an int >= 1). ``alpha``: the adapter output is
    scaled by ``alpha / rank``. ``dropout``: the probability of dropping an input element of
    the adapter branch while training (0 <= p < 1). ``target_modules``: names or fnmatch
    patterns (``"q_proj"``, ``"*.mlp.*"``), matched against a layer's full name, its last
    component and its dotted suffixes; ``None`` targets every :class:`~qkern.nn.QuantLinear`.
    Only ``QuantLinear`` and ``nn.Linear`` layers can be targets. ``seed``: the seed of A's
    initialisation (``None``: torch's global generator).

    >>> LoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj")).scaling
    2.0
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise _fail("rank", "an int >= 1", self.rank)
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) \
                or a <= 0:
            raise _fail("alpha", "a finite number > 0", a)
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise _fail("dropout", "a probability 0 <= p < 1", p)
        t = self.target_modules
        if isinstance(t, str):
            t = (t,)
        if t is not None:
            if not isinstance(t, Sequence) or not t or not all(
                    isinstance(s, str) and s for s in t):
                raise _fail("target_modules", "None or a non-empty sequence of layer names / "
                            "patterns", self.target_modules)
            object.__setattr__(self, "target_modules", tuple(t))
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int)):
            raise _fail("seed", "None or an int", self.seed)

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.rank


class LoRALinear(nn.Module):
    """``y = base(x) + dropout(x) @ A^T @ B^T * alpha / rank`` with ``base`` a frozen
    :class:`~qkern.nn.QuantLinear` or ``nn.Linear``; ``lora_A`` (rank, in) is Kaiming-uniform,
    ``lora_B`` (out, rank) zeros, so a new layer computes exactly what ``base`` does. Only
    ``lora_A`` and ``lora_B`` require grad; gradients reach the input through the quantized
    weight (``qkern.ops.autograd``).

    >>> import torch, qkern
    >>> from qkern.lora import LoRAConfig, LoRALinear
    >>> base = qkern.nn.QuantLinear.from_float(torch.nn.Linear(64, 32), "nf4", group_size=64,
    ...                                        double_quant=True)
    >>> layer = LoRALinear(base, LoRAConfig(rank=4))
    >>> x = torch.randn(3, 64)
    >>> torch.equal(layer(x), base(x))
    True
    """

    def __init__(self, base: nn.Module, cfg: LoRAConfig):
        super().__init__()
        if not isinstance(base, (QuantLinear, nn.Linear)):
            raise TypeError(f"LoRALinear wraps a QuantLinear or nn.Linear, got "
                            f"{type(base).__name__}")
        if not isinstance(cfg, LoRAConfig):
            raise TypeError(f"cfg must be a LoRAConfig, got {type(cfg).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = cfg.rank, float(cfg.alpha), cfg.scaling
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rank))
        gen = None if cfg.seed is None else torch.Generator().manual_seed(cfg.seed)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=gen)  # as nn.Linear
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def base_weight(self) -> torch.Tensor:
        """The frozen weight (out, in) in float32: decoded from a QuantLinear's buffers."""
        b = self.base
        w = b.dequantize_weight() if isinstance(b, QuantLinear) else b.weight
        return w.detach().float()

    def delta_weight(self) -> torch.Tensor:
        """``B A * alpha / rank`` (out, in), what merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (h * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The :class:`LoRALinear` layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, pat: str) -> bool:
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pat) for i in range(len(parts)))


def _targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    inner = {f"{n}.base" for n in lora_layers(model)}
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, (QuantLinear, nn.Linear)) and n not in inner and n}
    if cfg.target_modules is None:
        names = [n for n, m in linears.items() if isinstance(m, QuantLinear)]
        if not names:
            raise ValueError("the model has no QuantLinear layer: quantize it first "
                             "(qkern.quantize_model) or name the layers in target_modules")
        return names
    names = []
    for pat in cfg.target_modules:
        hit = [n for n in linears if _matches(n, pat)]
        if not hit:
            wrapped = [n for n in lora_layers(model) if _matches(n, pat)]
            if wrapped:
                raise ValueError(f"target_modules: {pat!r} names layers that already have "
                                 f"LoRA adapters ({wrapped[0]}, ...)")
            raise ValueError(f"target_modules: {pat!r} matches no QuantLinear / nn.Linear "
                             f"layer; the model has {sorted(linears)[:8]}"
                             + (" ..." if len(linears) > 8 else ""))
        names += [n for n in hit if n not in names]
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig, inplace: bool = False) -> nn.Module:
    """``model`` with each target layer wrapped in a :class:`LoRALinear` and every other
    parameter frozen (``requires_grad=False``): only the adapters train. The model is copied
    unless ``inplace=True``.

    >>> import torch, qkern
    >>> from qkern.lora import LoRAConfig, apply_lora
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
    ...                           torch.nn.Linear(64, 8))
    >>> q = qkern.quantize_model(net, qkern.WeightOnlyConfig(fmt="nf4", group_size=64,
    ...                                                        double_quant=True))
    >>> m = apply_lora(q, LoRAConfig(rank=4))
    >>> sorted(n for n, p in m.named_parameters() if p.requires_grad)
    ['0.lora_A', '0.lora_B', '2.lora_A', '2.lora_B']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(cfg, LoRAConfig):
        raise TypeError(f"cfg must be a LoRAConfig, got {type(cfg).__name__}")
    names = _targets(model, cfg)
    out = model if inplace else copy.deepcopy(model)
    seeded = cfg.seed is not None
    return wrap_layers(out, {n: replace(cfg, seed=cfg.seed + i) if seeded else cfg
                             for i, n in enumerate(names)})


def wrap_layers(model: nn.Module, configs: dict[str, LoRAConfig]) -> nn.Module:
    """Wraps the layers named in ``configs`` (exact names) in place, each with its config,
    and freezes every other parameter; returns ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, c in configs.items():
        _set(model, name, LoRALinear(model.get_submodule(name), c))
    return model


def quantized_like(base: nn.Module, linear: nn.Linear, requantize) -> QuantLinear:
    """``linear`` quantized as ``requantize`` says: a format name (with ``base``'s group
    size, symmetry and double quantization when ``base`` is a QuantLinear and the format
    takes them), or a dict of :meth:`QuantLinear.from_float` keyword arguments."""
    if isinstance(requantize, dict):
        return QuantLinear.from_float(linear, **requantize)
    kw: dict = {"fmt": requantize}
    f = QF.get(requantize)
    if isinstance(base, QuantLinear):
        q = base.weight_q
        kw["group_size"] = q.group_size if q.granularity == "group" else None
        kw["symmetric"] = q.zero_point is None
        if (q.double_quant is not None and f.kind == "codebook"
                and f.scale_rule != QF.SCALE_POW2_MX):
            kw["double_quant"] = True
    return QuantLinear.from_float(linear, **kw)


def _float_linear(layer: LoRALinear) -> nn.Linear:
    b = layer.base
    lin = nn.Linear(layer.in_features, layer.out_features, bias=b.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(layer.base_weight() + layer.delta_weight().detach().float())
        if b.bias is not None:
            lin.bias.copy_(b.bias.detach().float())
    lin.requires_grad_(False)
    return lin


def merge_lora(model: nn.Module, requantize=None) -> nn.Module:
    """A new model in which each :class:`LoRALinear` is replaced by one layer holding
    ``W' = W + B A * alpha / rank`` (``W`` the base weight, dequantized): a float
    ``nn.Linear`` when ``requantize`` is None; a :class:`~qkern.nn.QuantLinear` for a format
    name (``"nf4"``: the base layer's group size and double quantization) or a dict of
    ``QuantLinear.from_float`` arguments; with a ``qkern.quantization`` config
    (``qkern.WeightOnlyConfig(...)``) the merged float layers are quantized by
    ``qkern.quantize_model`` (its ``include`` defaults to the merged layers). ``model`` is
    not modified.

    >>> import torch, qkern
    >>> from qkern.lora import LoRAConfig, apply_lora, merge_lora
    >>> q = qkern.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)),
    ...                          qkern.WeightOnlyConfig(fmt="nf4", group_size=64))
    >>> merged = merge_lora(apply_lora(q, LoRAConfig(rank=2)), requantize="nf4")
    >>> type(merged[0]).__name__, merged[0].weight_q.format.name
    ('QuantLinear', 'nf4')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    ok = (None, str, dict, BaseConfig)
    if requantize is not None and not isinstance(requantize, ok[1:]):
        raise TypeError("requantize must be None, a format name, a dict of "
                        "QuantLinear.from_float arguments or a qkern quantization config, got "
                        f"{type(requantize).__name__}")
    if isinstance(requantize, str):
        QF.get(requantize)  # an unknown format fails before the copy
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers (apply_lora adds them)")
    out = copy.deepcopy(model)
    for name, layer in lora_layers(out).items():
        lin = _float_linear(layer)
        if isinstance(requantize, (str, dict)):
            lin = quantized_like(layer.base, lin, requantize)
        _set(out, name, lin)
    if isinstance(requantize, BaseConfig):
        cfg = requantize if requantize.include is not None else replace(
            requantize, include=sorted(layers))
        return quantize_model(out, cfg, inplace=True)
    return notify_quantized(out) if isinstance(requantize, (str, dict)) else out
